use std::sync::Arc;

use tower::Layer;

use super::service::{HealPolicy, HealService};
use crate::metrics::Metrics;
use crate::reload::ReloadCoordinator;

/// Wraps a forwarder in a [`HealService`].
#[derive(Clone)]
pub struct HealLayer {
    coordinator: Arc<ReloadCoordinator>,
    policy: HealPolicy,
    metrics: Arc<Metrics>,
}

impl HealLayer {
    pub fn new(
        coordinator: Arc<ReloadCoordinator>,
        policy: HealPolicy,
        metrics: Arc<Metrics>,
    ) -> HealLayer {
        HealLayer {
            coordinator,
            policy,
            metrics,
        }
    }
}

impl<S> Layer<S> for HealLayer {
    type Service = HealService<S>;

    fn layer(&self, inner: S) -> HealService<S> {
        HealService {
            inner,
            coordinator: self.coordinator.clone(),
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
        }
    }
}
