//! A small connection pool to the real database, sized like PostgREST's `db-pool` (default 10),
//! flushed after every schema reload as PostgREST does (#2620).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::{Client, NoTls};

pub struct Pool {
    uri: String,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<(u64, Client)>>,
    generation: AtomicU64,
    acquisition_timeout: Duration,
    pub max_size: usize,
}

pub enum PoolError {
    /// No connection could be made: PGRST000.
    Connect(tokio_postgres::Error),
    /// Every connection stayed busy past the acquisition timeout: PGRST003.
    Timeout,
}

pub struct PooledClient<'a> {
    pool: &'a Pool,
    generation: u64,
    client: Option<Client>,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(uri: &str, max_size: usize) -> Pool {
        Pool {
            uri: uri.to_string(),
            permits: Arc::new(Semaphore::new(max_size)),
            idle: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            acquisition_timeout: Duration::from_secs(10),
            max_size,
        }
    }

    pub async fn get(&self) -> Result<PooledClient<'_>, PoolError> {
        let permit = tokio::time::timeout(self.acquisition_timeout, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| PoolError::Timeout)?
            .expect("pool semaphore never closes");
        let generation = self.generation.load(Ordering::Acquire);
        let reused = {
            let mut idle = self.idle.lock().unwrap();
            let mut found = None;
            while let Some((g, client)) = idle.pop() {
                if g == generation && !client.is_closed() {
                    found = Some(client);
                    break;
                }
            }
            found
        };
        let client = match reused {
            Some(c) => c,
            None => self.connect().await.map_err(PoolError::Connect)?,
        };
        Ok(PooledClient { pool: self, generation, client: Some(client), _permit: permit })
    }

    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(&self.uri, NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Drops every idle connection and marks busy ones for closing when they come back.
    pub fn flush(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.idle.lock().unwrap().clear();
    }

    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

impl PooledClient<'_> {
    pub fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("client present until drop")
    }
}

impl Drop for PooledClient<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if !client.is_closed() && self.generation == self.pool.generation.load(Ordering::Acquire) {
                self.pool.idle.lock().unwrap().push((self.generation, client));
            }
        }
    }
}
