//! The balloon's saved state: its configuration, the target and the driver's `actual`, and the
//! statistics buffer it holds (the driver waits for it back, so a restored device must return
//! that same buffer when it next wants statistics). Queues are the transport's.

use serde::{Deserialize, Serialize};

use super::{target_pages, Balloon, BalloonConfig, BalloonError, QUEUE_SIZE};
use crate::persist::Persist;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    pub config: BalloonConfig,
    pub actual_pages: u32,
    #[serde(default)]
    pub stats_head: Option<u16>,
}

/// A restored balloon needs no host resources.
#[derive(Clone, Debug, Default)]
pub struct BalloonConstructorArgs;

impl Persist for Balloon {
    type State = BalloonState;
    type ConstructorArgs = BalloonConstructorArgs;
    type Error = BalloonError;

    fn save(&self) -> BalloonState {
        BalloonState {
            config: self.config,
            actual_pages: self.space.actual_pages,
            stats_head: self.stats_head,
        }
    }

    fn restore(_: BalloonConstructorArgs, state: &BalloonState) -> Result<Self, BalloonError> {
        target_pages(state.config.target_mib)?;
        if let Some(head) = state.stats_head {
            if head >= QUEUE_SIZE || state.config.stats_interval_s == 0 {
                return Err(BalloonError::BadState(format!(
                    "statistics buffer {head} without a statistics queue of that size"
                )));
            }
        }
        let mut balloon = Balloon::new(state.config)?;
        balloon.space.actual_pages = state.actual_pages;
        balloon.stats_head = state.stats_head;
        Ok(balloon)
    }
}
