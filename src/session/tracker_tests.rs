use super::*;

fn rfq(t: &mut Tracker, emit: &mut BytesMut, fx: &mut Effects) -> bool {
    t.on_server(be::READY_FOR_QUERY, b"I", emit, fx)
}

#[test]
fn injected_parse_complete_is_swallowed_and_synthetic_is_ordered() {
    let mut t = Tracker::default();
    let (mut emit, mut fx) = (BytesMut::new(), Effects::default());
    t.push(
        Req::Parse {
            stmt: Some(1),
            client_name: None,
            injected: true,
        },
        &mut emit,
        &mut fx,
    );
    t.push(Req::Bind, &mut emit, &mut fx);
    t.push(synthetic_parse_complete(), &mut emit, &mut fx);
    t.push(Req::Sync, &mut emit, &mut fx);
    assert!(emit.is_empty(), "synthetic waits for earlier answers");
    assert!(!t.on_server(be::PARSE_COMPLETE, b"", &mut emit, &mut fx));
    assert!(emit.is_empty());
    assert!(t.on_server(be::BIND_COMPLETE, b"", &mut emit, &mut fx));
    assert_eq!(&emit[..], &[b'1', 0, 0, 0, 4]);
    assert!(rfq(&mut t, &mut emit, &mut fx));
    assert!(t.is_empty());
}

#[test]
fn error_skips_to_sync_and_unprepares() {
    let mut t = Tracker::default();
    let (mut emit, mut fx) = (BytesMut::new(), Effects::default());
    t.push(Req::Bind, &mut emit, &mut fx);
    t.push(
        Req::Parse {
            stmt: Some(7),
            client_name: Some(b"s1".to_vec().into()),
            injected: false,
        },
        &mut emit,
        &mut fx,
    );
    t.push(synthetic_parse_complete(), &mut emit, &mut fx);
    assert!(t.on_server(be::ERROR_RESPONSE, b"", &mut emit, &mut fx));
    assert_eq!(fx.unprepared(), &[7]);
    assert!(emit.is_empty(), "no synthetic answer after an error");
    // Messages sent before the Sync get no answer either.
    t.push(Req::Execute, &mut emit, &mut fx);
    t.push(Req::Sync, &mut emit, &mut fx);
    assert_eq!(t.len(), 1);
    assert!(rfq(&mut t, &mut emit, &mut fx));
    assert!(t.is_empty());
}

#[test]
fn syncs_read_in_copy_in_mode_owe_nothing() {
    // tokio-postgres / libpq: Bind Execute Sync, CopyData.., CopyDone Sync.
    let mut t = Tracker::default();
    let (mut emit, mut fx) = (BytesMut::new(), Effects::default());
    t.push(Req::Bind, &mut emit, &mut fx);
    t.push(Req::Execute, &mut emit, &mut fx);
    t.push(Req::Sync, &mut emit, &mut fx);
    assert!(t.on_server(be::BIND_COMPLETE, b"", &mut emit, &mut fx));
    assert!(t.on_server(be::COPY_IN_RESPONSE, b"", &mut emit, &mut fx));
    assert!(t.in_copy_in());
    assert!(!t.client_copy_end(), "copy already started: no marker");
    t.push(Req::Sync, &mut emit, &mut fx);
    t.push(Req::Close { injected: false }, &mut emit, &mut fx);
    t.push(Req::Sync, &mut emit, &mut fx);
    assert!(t.on_server(be::COMMAND_COMPLETE, b"", &mut emit, &mut fx));
    assert!(rfq(&mut t, &mut emit, &mut fx));
    assert!(
        t.on_server(be::CLOSE_COMPLETE, b"", &mut emit, &mut fx),
        "CloseComplete must reach the client"
    );
    assert!(rfq(&mut t, &mut emit, &mut fx));
    assert!(t.is_empty());
}

#[test]
fn copy_end_sent_before_copy_in_response() {
    let mut t = Tracker::default();
    let (mut emit, mut fx) = (BytesMut::new(), Effects::default());
    t.push(Req::Query, &mut emit, &mut fx);
    assert!(t.client_copy_end());
    t.push(Req::CopyEnd, &mut emit, &mut fx);
    t.push(Req::Query, &mut emit, &mut fx);
    assert!(t.on_server(be::COPY_IN_RESPONSE, b"", &mut emit, &mut fx));
    assert!(!t.in_copy_in(), "the client already ended the copy");
    assert!(t.on_server(be::COMMAND_COMPLETE, b"", &mut emit, &mut fx));
    assert!(rfq(&mut t, &mut emit, &mut fx));
    assert_eq!(t.len(), 1);
    // A COPY that fails before starting leaves no marker behind.
    t.push(Req::CopyEnd, &mut emit, &mut fx);
    assert!(t.on_server(be::ERROR_RESPONSE, b"", &mut emit, &mut fx));
    assert!(rfq(&mut t, &mut emit, &mut fx));
    assert!(t.is_empty());
}

#[test]
fn injected_query_answers_are_swallowed() {
    let mut t = Tracker::default();
    let (mut emit, mut fx) = (BytesMut::new(), Effects::default());
    t.push(Req::Injected, &mut emit, &mut fx);
    t.push(Req::Query, &mut emit, &mut fx);
    assert!(!t.on_server(be::COMMAND_COMPLETE, b"", &mut emit, &mut fx));
    assert!(!t.on_server(be::READY_FOR_QUERY, b"I", &mut emit, &mut fx));
    assert!(t.on_server(be::ROW_DESCRIPTION, b"", &mut emit, &mut fx));
    assert!(t.on_server(be::READY_FOR_QUERY, b"T", &mut emit, &mut fx));
    assert_eq!(t.status, TxnStatus::InTransaction);
}
