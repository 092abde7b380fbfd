//! The trace backend's settings and profiler (see `onsite-trace`). It has no `ONSITE_TRACE_*`
//! variables: what a trace holds is decided by the service's own subscriber and filters, and
//! the service adds the layer itself (`onsite::trace::layer()`).

use onsite_core::Profiler;

#[derive(Debug, Default, Clone)]
pub(crate) struct Settings {}

impl Settings {
    pub(crate) fn apply_env(&mut self, _env: &mut crate::env::Reader) {}

    /// The trace profiler. Dropping it (onsite's shutdown) joins tracing-chrome's writer thread.
    pub(crate) fn profilers(&self) -> Vec<Box<dyn Profiler>> {
        vec![Box::new(onsite_trace::TraceProfiler::new())]
    }
}
