use std::sync::Arc;

use tower::Layer;

use super::service::{HealParts, HealPolicy, HealService, MAX_CONCURRENT_REPLAYS};
use crate::metrics::Metrics;
use crate::reload::{CatalogCheck, ReloadCoordinator};

/// Wraps a forwarder in a [`HealService`].
#[derive(Clone)]
pub struct HealLayer {
    coordinator: Arc<ReloadCoordinator>,
    policy: HealPolicy,
    metrics: Arc<Metrics>,
    catalog: Option<Arc<CatalogCheck>>,
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
        HealLayer { coordinator, policy, metrics, catalog }
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
            replay_slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REPLAYS)),
        })
    }
}
