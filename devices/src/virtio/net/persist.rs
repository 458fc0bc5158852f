//! The network device's saved state and its `Persist` implementation (on a TAP backend).
//!
//! The queues are the transport's (`MmioTransportState`); frames in flight are not saved (a
//! frame read from the TAP but not yet delivered is lost, as on a real link). So the state is
//! which TAP the device is attached to and the guest's MAC.

use serde::{Deserialize, Serialize};

use super::{Net, NetConfig, NetError, Tap};
use crate::mmds::{MmdsNetConfig, MmdsNetState, SharedMmds};
use crate::persist::Persist;
use crate::rate_limiter::RateLimiterConfig;

/// A network device's host attachment and guest address. Same fields as the `Net` entry of the
/// VMM's snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub tap: String,
    pub mac: [u8; 6],
    /// The RX rate limiter's configuration (snapshot format 4; older snapshots: none). The
    /// buckets' fill level is not saved: a restored device starts with full buckets.
    #[serde(default)]
    pub rx_rate_limiter: RateLimiterConfig,
    /// The TX rate limiter's configuration.
    #[serde(default)]
    pub tx_rate_limiter: RateLimiterConfig,
    /// The MMDS this interface served (snapshot format 6; older snapshots: none): its address
    /// and version, not its document (as Firecracker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmds: Option<MmdsNetState>,
}

/// Host resources of a restored network device: each `None` keeps what the snapshot recorded
/// (a clone usually needs its own TAP, and its own MAC if it shares a network).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetConstructorArgs {
    pub tap: Option<String>,
    /// An already-open TAP to use instead of opening `tap` (see `NetConfig::fd`).
    pub fd: Option<std::os::fd::RawFd>,
    pub mac: Option<[u8; 6]>,
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// The VM's MMDS, for an interface that served one (None: a new, empty one).
    pub mmds: Option<SharedMmds>,
}

impl Persist for Net<Tap> {
    type State = NetState;
    type ConstructorArgs = NetConstructorArgs;
    type Error = NetError;

    fn save(&self) -> NetState {
        NetState {
            tap: self.backend.name().to_string(),
            mac: self.mac,
            rx_rate_limiter: self.rx_limiter.config(),
            tx_rate_limiter: self.tx_limiter.config(),
            mmds: self.mmds.as_ref().map(|r| r.state()),
        }
    }

    /// Attaches to (or creates) the TAP, like `Net::new`.
    fn restore(args: NetConstructorArgs, state: &NetState) -> Result<Self, NetError> {
        Net::new(NetConfig {
            tap: args.tap.unwrap_or_else(|| state.tap.clone()),
            fd: args.fd,
            mac: Some(args.mac.unwrap_or(state.mac)),
            rx_rate_limiter: args.rx_rate_limiter.unwrap_or(state.rx_rate_limiter),
            tx_rate_limiter: args.tx_rate_limiter.unwrap_or(state.tx_rate_limiter),
            mmds: state
                .mmds
                .as_ref()
                .map(|m| MmdsNetConfig::restore(m, args.mmds)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::net::TapError;

    fn tx_limit() -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::rate_limiter::TokenBucketConfig {
                size: 1000,
                one_time_burst: None,
                refill_time: 1000,
            }),
        }
    }

    #[test]
    fn states_without_rate_limiters_decode_as_unlimited() {
        let state: NetState =
            serde_json::from_str(r#"{"tap": "t", "mac": [2,0,0,0,0,1]}"#).unwrap();
        assert_eq!(state.rx_rate_limiter, RateLimiterConfig::default());
        assert_eq!(state.tx_rate_limiter, RateLimiterConfig::default());
        assert_eq!(state.mmds, None);
    }

    /// Needs CAP_NET_ADMIN and /dev/net/tun; reports and returns when they are missing.
    #[test]
    fn the_mmds_address_and_version_survive_but_not_the_document() {
        use crate::mmds::{MmdsVersion, DEFAULT_IPV4};
        let name = format!("dmm{}", std::process::id() % 100_000);
        let before = SharedMmds::default();
        before.lock().store.set_version(MmdsVersion::V2, true);
        before
            .lock()
            .store
            .put(serde_json::json!({"secret": "x"}))
            .unwrap();
        let net = match Net::new(NetConfig {
            tap: name,
            fd: None,
            mac: None,
            rx_rate_limiter: RateLimiterConfig::default(),
            tx_rate_limiter: RateLimiterConfig::default(),
            mmds: Some(MmdsNetConfig {
                ipv4: DEFAULT_IPV4,
                mmds: before,
            }),
        }) {
            Ok(net) => net,
            Err(e) => {
                eprintln!("skipping TAP test: {e}");
                return;
            }
        };
        let state = net.save();
        let saved = MmdsNetState {
            ipv4: DEFAULT_IPV4,
            version: MmdsVersion::V2,
            imds_compat: true,
        };
        assert_eq!(state.mmds, Some(saved));
        drop(net);
        let after = SharedMmds::default();
        let args = NetConstructorArgs {
            mmds: Some(after.clone()),
            ..NetConstructorArgs::default()
        };
        let restored = Net::restore(args, &state).unwrap();
        assert_eq!(restored.mmds_ipv4(), Some(DEFAULT_IPV4));
        assert_eq!(after.lock().store.version(), MmdsVersion::V2);
        assert!(after.lock().store.imds_compat());
        assert_eq!(after.lock().store.value(), serde_json::json!({}));
        assert_eq!(restored.save().mmds, Some(saved));
    }

    /// Needs CAP_NET_ADMIN and /dev/net/tun; reports and returns when they are missing.
    #[test]
    fn restore_of_save_round_trips_and_takes_overrides() {
        let name = format!("dmp{}", std::process::id() % 100_000);
        let mac = [0x02, 0, 0, 0, 0, 0x42];
        let net = match Net::new(NetConfig {
            tap: name.clone(),
            fd: None,
            mac: Some(mac),
            rx_rate_limiter: RateLimiterConfig::default(),
            tx_rate_limiter: tx_limit(),
            mmds: None,
        }) {
            Ok(net) => net,
            Err(e) => {
                eprintln!("skipping TAP test: {e}");
                return;
            }
        };
        let state = net.save();
        assert_eq!(
            state,
            NetState {
                tap: name.clone(),
                mac,
                rx_rate_limiter: RateLimiterConfig::default(),
                tx_rate_limiter: tx_limit(),
                mmds: None,
            }
        );
        drop(net);
        let restored = Net::restore(NetConstructorArgs::default(), &state).unwrap();
        assert_eq!(restored.save(), state);
        drop(restored);

        let other = format!("dmq{}", std::process::id() % 100_000);
        let args = NetConstructorArgs {
            tap: Some(other.clone()),
            fd: None,
            mac: Some([0x02, 0, 0, 0, 0, 0x43]),
            rx_rate_limiter: Some(tx_limit()),
            tx_rate_limiter: None,
            mmds: None,
        };
        let clone = Net::restore(args, &state).unwrap();
        assert_eq!(
            clone.save(),
            NetState {
                tap: other,
                mac: [0x02, 0, 0, 0, 0, 0x43],
                rx_rate_limiter: tx_limit(),
                tx_rate_limiter: tx_limit(),
                mmds: None,
            }
        );
    }

    #[test]
    fn restore_of_a_bad_state_is_an_error() {
        for tap in ["", "a-name-that-is-too-long", "nul\0"] {
            let state = NetState {
                tap: tap.to_string(),
                mac: [0x02, 0, 0, 0, 0, 1],
                rx_rate_limiter: RateLimiterConfig::default(),
                tx_rate_limiter: RateLimiterConfig::default(),
                mmds: None,
            };
            assert!(matches!(
                Net::restore(NetConstructorArgs::default(), &state),
                Err(NetError::Tap(TapError::InvalidName(_)))
            ));
        }
    }
}
