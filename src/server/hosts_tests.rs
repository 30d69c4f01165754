//! Tests of `server::hosts`: host lists, libpq attributes, ordering and bans.
use super::*;

const PRIMARY: Role = Role {
    in_recovery: false,
    read_only: false,
};
const STANDBY: Role = Role {
    in_recovery: true,
    read_only: true,
};

fn hosts(attrs: TargetSessionAttrs) -> Hosts {
    Hosts::new(
        parse_hosts("a,b,c", 5432).expect("valid"),
        attrs,
        LoadBalanceHosts::Disable,
    )
}

#[test]
fn parses_host_lists_with_ports() {
    let h = parse_hosts("db1, db2:5433,[::1]:5434,::1,[fe80::1]", 5432).expect("valid");
    let s: Vec<String> = h.iter().map(|a| a.to_string()).collect();
    assert_eq!(
        s,
        [
            "db1:5432",
            "db2:5433",
            "[::1]:5434",
            "[::1]:5432",
            "[fe80::1]:5432"
        ]
    );
    assert!(parse_hosts("a,,b", 1).is_err());
    assert!(parse_hosts("a:0", 1).is_err());
    assert!(parse_hosts("a:x", 1).is_err());
    assert!(parse_hosts("[::1", 1).is_err());
}

#[test]
fn attributes_follow_libpq() {
    use TargetSessionAttrs::*;
    let ro_primary = Role {
        in_recovery: false,
        read_only: true,
    };
    assert!(ReadWrite.accepts(PRIMARY) && !ReadWrite.accepts(STANDBY));
    assert!(!ReadWrite.accepts(ro_primary) && Primary.accepts(ro_primary));
    assert!(ReadOnly.accepts(STANDBY) && ReadOnly.accepts(ro_primary));
    assert!(Standby.accepts(STANDBY) && !Standby.accepts(ro_primary));
    assert!(Any.accepts(STANDBY) && PreferStandby.accepts(PRIMARY));
}

#[tokio::test(start_paused = true)]
async fn known_primary_first_then_unknown_then_other_roles_then_banned() {
    let h = hosts(TargetSessionAttrs::ReadWrite);
    let now = Instant::now();
    assert_eq!(h.order(now, |_| 0), vec![0, 1, 2]);
    h.reported(0, STANDBY);
    h.reported(2, PRIMARY);
    assert_eq!(h.order(now, |_| 0), vec![2, 1, 0]);
    h.failed(2, "refused", now);
    assert_eq!(
        h.order(now, |_| 0),
        vec![1, 0, 2],
        "banned last, never dropped"
    );
    // The ban doubles and expires.
    assert_eq!(h.order(now + Duration::from_secs(1), |_| 0), vec![2, 1, 0]);
    h.failed(2, "refused", now);
    assert_eq!(h.order(now + Duration::from_secs(1), |_| 0)[2], 2);
    assert_eq!(h.order(now + Duration::from_secs(2), |_| 0)[0], 2);
    assert_eq!(h.current(), None, "failing");
    h.reported(2, PRIMARY);
    assert_eq!(h.current(), Some(2));
}

#[tokio::test(start_paused = true)]
async fn replica_pools_rotate_and_prefer_standbys() {
    let h = hosts(TargetSessionAttrs::ReadOnly);
    let now = Instant::now();
    let firsts: Vec<usize> = (0..6).map(|_| h.order(now, |_| 0)[0]).collect();
    assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
    let p = hosts(TargetSessionAttrs::PreferStandby);
    p.reported(0, PRIMARY);
    p.reported(1, STANDBY);
    assert_eq!(p.order(now, |_| 0)[0], 1);
    assert_eq!(*p.order(now, |_| 0).last().unwrap_or(&9), 0);
}

#[test]
fn role_comes_from_reported_parameters() {
    let get = |k: &str| match k {
        "in_hot_standby" => Some("on".to_string()),
        _ => None,
    };
    assert_eq!(
        role_from_params(get),
        Some(STANDBY).map(|r| Role {
            read_only: false,
            ..r
        })
    );
    assert_eq!(role_from_params(|_| None), None);
}
