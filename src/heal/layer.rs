use std::sync::Arc;

use tower::Layer;

use super::service::{HealParts, HealPolicy, HealService, MAX_CONCURRENT_REPLAYS};
use crate::metrics::Metrics;
use crate::reload::{CatalogCheck, ReloadCoordinator, WriteBarrier};

/// Wraps a forwarder in a [`HealService`].
#[derive(Clone)]
pub struct HealLayer {
    coordinator: Arc<ReloadCoordinator>,
    policy: HealPolicy,
    metrics: Arc<Metrics>,
    catalog: Option<Arc<CatalogCheck>>,
    barrier: Option<Arc<WriteBarrier>>,
}

impl HealLayer {
    /// `catalog` keeps clients' own mistakes from causing reloads; None turns the check off,
    /// leaving the reload budget as the only limit.
    pub fn new(
        coordinator: Arc<ReloadCoordinator>,
        policy: HealPolicy,
        metrics: Arc<Metrics>,
        catalog: Option<Arc<CatalogCheck>>,
    ) -> HealLayer {
        HealLayer { coordinator, policy, metrics, catalog, barrier: None }
    }

    /// Holds each write until PostgREST's cache is shown to hold what it depends on.
    pub fn with_write_barrier(mut self, barrier: Option<Arc<WriteBarrier>>) -> HealLayer {
        self.barrier = barrier;
        self
    }
}

impl<S> Layer<S> for HealLayer {
    type Service = HealService<S>;

    fn layer(&self, inner: S) -> HealService<S> {
        HealService::new(HealParts {
            inner,
            coordinator: self.coordinator.clone(),
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
            catalog: self.catalog.clone(),
            barrier: self.barrier.clone(),
            replay_slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REPLAYS)),
        })
    }
}
