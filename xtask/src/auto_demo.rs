//! `cargo xtask demo --auto`: not built yet (issue 6).

use crate::demo::DemoArgs;

pub(crate) fn run(_args: &DemoArgs) -> Result<(), String> {
    Err("`--auto` needs automatic capture rules, which are not built yet".into())
}
