//! `cargo xtask demo` runs inside the test command: every claim it prints is asserted.
use ztunnel_tests::demo;

#[test]
fn the_demo_shows_plaintext_then_mtls_then_refusals_at_l4_and_l7_then_an_upgrade_and_leaves_nothing()
-> anyhow::Result<()> {
    ztunnel_tests::require_root();
    let r = demo::run(&demo::Options { keep: false })?;
    assert!(r.plaintext_before_enrolment);
    assert!(r.only_tls_after_enrolment);
    assert!(r.identities_in_access_log);
    assert!(r.long_lived_connection_survived);
    assert!(r.policy_refused);
    assert!(r.resolved_by_name);
    assert!(r.waypoint_refused_post);
    assert_eq!(r.waypoint_split, (90, 10));
    assert!(r.upgrade_calls > 0, "no call during the upgrade");
    assert_eq!(r.upgrade_failed_calls, 0);
    assert!(
        r.upgrade_pings.is_some_and(|n| n > 0),
        "the long-lived connection across the upgrade: {:?}",
        r.upgrade_pings
    );
    assert!(r.old_ztunnel_exited);
    assert!(r.nothing_left_behind);
    assert!(ztunnel_tests::leftovers(demo::ID)?.is_empty());
    Ok(())
}
