use super::*;

#[test]
fn renders_with_prefix_and_bounded_class_labels() {
    let m = Metrics::new();
    m.error("server", "42P01");
    m.error("proxy", "x");
    m.checkout_wait.with_label_values(&["db/u"]).observe(0.002);
    let text = m.render();
    assert!(text.contains("pgsidecar_errors_total{class=\"42\",origin=\"server\"} 1"));
    assert!(text.contains("pgsidecar_errors_total{class=\"??\",origin=\"proxy\"} 1"));
    assert!(text.contains("pgsidecar_checkout_wait_seconds_bucket"));
    assert!(text.contains("pgsidecar_build_info"));
}
