//! nginx (Debian's package) as the API gateway in front of the guard, routing as Supabase's Envoy
//! `api-gw` routes REST: `/rest/v1/` to the guard with the prefix stripped, a 30 s route timeout,
//! `X-Forwarded-Prefix`. On a free port; stopped and removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Gateway {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl Gateway {
    /// Routes `/rest/v1/` to `upstream` (host:port).
    pub async fn start(upstream: std::net::SocketAddr) -> Gateway {
        let port = super::pg::free_port();
        let dir = std::env::temp_dir().join(format!("pgrst-guard-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let temp = |name: &str| dir.join(name).display().to_string();
        let config = format!(
            "user root;\nworker_processes 1;\ndaemon off;\npid {pid};\nerror_log {log} warn;\nevents {{}}\n\
             http {{\n  access_log off;\n  client_body_temp_path {body};\n  proxy_temp_path {proxy};\n\
             fastcgi_temp_path {fastcgi};\n  uwsgi_temp_path {uwsgi};\n  scgi_temp_path {scgi};\n\
             server {{\n    listen 127.0.0.1:{port};\n\
             location /rest/v1/ {{\n      proxy_pass http://{upstream}/;\n      proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n      proxy_set_header X-Forwarded-Prefix /rest/v1/;\n\
             proxy_set_header X-Forwarded-For $remote_addr;\n      proxy_read_timeout 30s;\n\
             proxy_send_timeout 30s;\n    }}\n  }}\n}}\n",
            pid = temp("nginx.pid"),
            log = temp("error.log"),
            body = temp("body"),
            proxy = temp("proxy"),
            fastcgi = temp("fastcgi"),
            uwsgi = temp("uwsgi"),
            scgi = temp("scgi"),
        );
        let config_path = dir.join("nginx.conf");
        std::fs::write(&config_path, config).expect("write nginx.conf");
        let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("nginx is not installed (Debian: apt-get install nginx; .ci/run does)");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config_path)
            .arg("-p")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let gateway = Gateway { port, dir, child };
        let up = super::client::eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        assert!(
            up,
            "nginx did not start: {}",
            std::fs::read_to_string(gateway.dir.join("error.log")).unwrap_or_default()
        );
        gateway
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
