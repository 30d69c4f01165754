use super::*;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rand::Rng;

/// Verifiers PostgreSQL 15 wrote to pg_authid for `CREATE ROLE ... PASSWORD`.
const PG_VERIFIER_POSTGRES: &str = "SCRAM-SHA-256$4096:3A7RKauErQHUnHjP7mmz3g==$DJVAB7HR5XDg2xVWb5hD/YVri18dr5eVSNvK2dWUL7M=:D/LUBu1X4Vad8kZgwtsjn9uaxkpSjHf0LdNZBTiPAtE=";
/// Password E'\uFB01x\u00A0y\u00ADz', which SASLprep turns into "fix yz".
const PG_VERIFIER_UNICODE: &str = "SCRAM-SHA-256$4096:/3QWp0IFoCOsdoLG5kvCKw==$jB31ZQSMBSFhmmPsOb65KSrqW+r5mK6i3Y1TCtYLOWM=:OdDILcN3uLN1OIwO0i7YsoyOzY1pJ3hcIU5Wu+gUmqA=";
const UNICODE_PASSWORD: &str = "\u{FB01}x\u{A0}y\u{AD}z";

fn cheap_verifier(password: &str) -> ScramVerifier {
    ScramVerifier::from_password(password, b"0123456789abcdef", 16)
}

/// Full exchange with postgres-protocol's client.
fn exchange(server: &mut ScramServer, password: &str) -> Result<(), ScramError> {
    let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    let server_first = server.handle_client_first(client.message())?;
    client
        .update(&server_first)
        .map_err(|_| ScramError::Malformed("client rejected server-first"))?;
    let server_final = server.handle_client_final(client.message())?;
    client
        .finish(&server_final)
        .map_err(|_| ScramError::Malformed("client rejected server-final"))?;
    Ok(())
}

#[test]
fn round_trip_plain() {
    let secret = Secret::Plain("s3cret pässword".into());
    let mut server = ScramServer::new(&secret).unwrap();
    exchange(&mut server, "s3cret pässword").unwrap();
    let mut server = ScramServer::new_for_user("alice", &secret).unwrap();
    exchange(&mut server, "s3cret pässword").unwrap();
}

#[test]
fn round_trip_verifier() {
    let secret = Secret::parse(PG_VERIFIER_POSTGRES);
    let mut server = ScramServer::new(&secret).unwrap();
    exchange(&mut server, "postgres").unwrap();

    let secret = Secret::Scram(cheap_verifier("pw"));
    let mut server = ScramServer::new(&secret).unwrap();
    exchange(&mut server, "pw").unwrap();
}

#[test]
fn round_trip_saslprep_matches_postgres() {
    // PostgreSQL and the client both SASLprep; a server that didn't would fail here.
    let secret = Secret::parse(PG_VERIFIER_UNICODE);
    let mut server = ScramServer::new(&secret).unwrap();
    exchange(&mut server, UNICODE_PASSWORD).unwrap();
    let mut server = ScramServer::new(&secret).unwrap();
    exchange(&mut server, "fix yz").unwrap();
}

#[test]
fn wrong_password_is_proof_mismatch() {
    let mut server = ScramServer::from_verifier(cheap_verifier("right"));
    assert_eq!(
        exchange(&mut server, "wrong"),
        Err(ScramError::ProofMismatch)
    );
    // The exchange is over after a failure.
    assert_eq!(
        server.handle_client_final(b"c=biws,r=x,p=AAAA"),
        Err(ScramError::InvalidState)
    );
}

#[test]
fn md5_secret_cannot_do_scram() {
    assert!(ScramServer::new(&Secret::parse("md590a5cf0bcc432258dac4326b0aa1ff09")).is_none());
}

#[test]
fn empty_plain_password_never_authenticates() {
    let mut server = ScramServer::new(&Secret::Plain(String::new())).unwrap();
    assert_eq!(exchange(&mut server, ""), Err(ScramError::ProofMismatch));
}

#[test]
fn mock_server_fails_like_wrong_password_with_stable_salt() {
    let salt_of = |server: &mut ScramServer| {
        let first = server.handle_client_first(b"n,,n=,r=abc").unwrap();
        let first = String::from_utf8(first).unwrap();
        let salt = first
            .split(',')
            .find_map(|f| f.strip_prefix("s="))
            .unwrap()
            .to_owned();
        assert!(first.ends_with(",i=4096"));
        salt
    };
    let a1 = salt_of(&mut mock_server_for("alice"));
    let a2 = salt_of(&mut mock_server_for("alice"));
    let b = salt_of(&mut mock_server_for("bob"));
    assert_eq!(a1, a2);
    assert_ne!(a1, b);
    assert_eq!(STANDARD.decode(&a1).unwrap().len(), DEFAULT_SALT_LEN);
    // A Plain user gets exactly the salt an unknown user of that name would.
    let plain = Secret::Plain("pw".into());
    assert_eq!(
        salt_of(&mut ScramServer::new_for_user("alice", &plain).unwrap()),
        a1
    );

    let mut mock = mock_server_for("alice");
    assert_eq!(
        exchange(&mut mock, "anything"),
        Err(ScramError::ProofMismatch)
    );
}

#[test]
fn rfc7677_test_vector() {
    let verifier = ScramVerifier::from_password(
        "pencil",
        &STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
        4096,
    );
    let mut server = ScramServer::from_verifier(verifier);
    let server_first = server
        .handle_client_first_with_nonce(
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            b"%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        )
        .unwrap();
    assert_eq!(
        server_first,
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    );
    let server_final = server
        .handle_client_final(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
        .unwrap();
    assert_eq!(
        server_final,
        b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    );
}

#[test]
fn verifier_format_round_trip() {
    for s in [PG_VERIFIER_POSTGRES, PG_VERIFIER_UNICODE] {
        let v = ScramVerifier::parse(s).unwrap();
        assert_eq!(v.iterations, 4096);
        assert_eq!(v.salt.len(), 16);
        assert_eq!(v.to_string_pg(), s);
    }
    let v = ScramVerifier::generate("pw");
    assert_eq!(
        ScramVerifier::parse(&v.to_string_pg())
            .unwrap()
            .to_string_pg(),
        v.to_string_pg()
    );
    assert!(!format!("{v:?}").contains(&STANDARD.encode(v.stored_key)));
}

#[test]
fn from_password_matches_postgres() {
    let pg = ScramVerifier::parse(PG_VERIFIER_POSTGRES).unwrap();
    let ours = ScramVerifier::from_password("postgres", &pg.salt, 4096);
    assert_eq!(ours.to_string_pg(), PG_VERIFIER_POSTGRES);

    let pg = ScramVerifier::parse(PG_VERIFIER_UNICODE).unwrap();
    let ours = ScramVerifier::from_password(UNICODE_PASSWORD, &pg.salt, 4096);
    assert_eq!(ours.to_string_pg(), PG_VERIFIER_UNICODE);

    // postgres-protocol's own test vector (its password::scram_sha_256_salt).
    let salt: Vec<u8> = (1..=16).collect();
    assert_eq!(
        ScramVerifier::from_password("secret", &salt, 4096).to_string_pg(),
        "SCRAM-SHA-256$4096:AQIDBAUGBwgJCgsMDQ4PEA==$8rrDg00OqaiWXJ7p+sCgHEIaBSHY89ZJl3mfIsf32oY=:05L1f+yZbiN8O0AnO40Og85NNRhvzTS57naKRWCcsIA="
    );
}

#[test]
fn verifier_parse_rejects_bad_input() {
    let key = STANDARD.encode([7u8; 32]);
    let short = STANDARD.encode([7u8; 31]);
    let good = format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}");
    assert!(ScramVerifier::parse(&good).is_some());
    for bad in [
        format!("SCRAM-SHA-256$0:c2FsdA==${key}:{key}"),
        format!("SCRAM-SHA-256$1000001:c2FsdA==${key}:{key}"),
        format!("SCRAM-SHA-256$99999999999:c2FsdA==${key}:{key}"),
        format!("SCRAM-SHA-256$+4096:c2FsdA==${key}:{key}"),
        format!("SCRAM-SHA-256$-1:c2FsdA==${key}:{key}"),
        format!("SCRAM-SHA-256$:c2FsdA==${key}:{key}"),
        format!("SCRAM-SHA-256$4096:${key}:{key}"),
        format!("SCRAM-SHA-256$4096:c2Fsd!==${key}:{key}"),
        format!("SCRAM-SHA-256$4096:c2FsdA==${short}:{key}"),
        format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{short}"),
        format!("SCRAM-SHA-256$4096:c2FsdA==${key}"),
        format!("SCRAM-SHA-256$4096:c2FsdA==${key}:{key}$x"),
        format!("SCRAM-SHA-256$4096:c2FsdA==:x${key}:{key}"),
        format!("SCRAM-SHA-1$4096:c2FsdA==${key}:{key}"),
        format!("scram-sha-256$4096:c2FsdA==${key}:{key}"),
        "SCRAM-SHA-256$".to_owned(),
    ] {
        assert!(ScramVerifier::parse(&bad).is_none(), "{bad}");
    }
}

#[test]
fn client_first_errors() {
    let cases: &[(&[u8], ScramError)] = &[
        (
            b"p=tls-server-end-point,,n=,r=abc",
            ScramError::ChannelBindingUnsupported,
        ),
        (b"n,a=bob,n=,r=abc", ScramError::AuthzidUnsupported),
        (b"n,,m=ext,n=,r=abc", ScramError::UnsupportedExtension),
        (b"n,,n=,r=", ScramError::Malformed("empty client nonce")),
        (
            b"n,,n=,r=a\x7fb",
            ScramError::Malformed("client nonce contains invalid characters"),
        ),
        (b"n,,n=,r=abc,", ScramError::Malformed("attribute expected")),
        (
            b"n,,n=,r=abc,1=x",
            ScramError::Malformed("attribute expected"),
        ),
        (b"n,,n=", ScramError::Malformed("missing attribute")),
        (b"n,,r=abc", ScramError::Malformed("unexpected attribute")),
        (
            b"x,,n=,r=abc",
            ScramError::Malformed("unexpected channel-binding flag"),
        ),
        (
            b"",
            ScramError::Malformed("unexpected channel-binding flag"),
        ),
        (
            b"n",
            ScramError::Malformed("comma expected after channel-binding flag"),
        ),
        (
            b"n,",
            ScramError::Malformed("comma expected after gs2 header"),
        ),
        (
            b"n,,n=,r=a\0c",
            ScramError::Malformed("message contains a NUL byte"),
        ),
    ];
    for (input, want) in cases {
        let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
        assert_eq!(
            server.handle_client_first(input).as_ref(),
            Err(want),
            "{}",
            String::from_utf8_lossy(input)
        );
    }
    // Username is ignored, non-UTF-8 ones included; extensions after r= are ignored.
    let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
    assert!(server
        .handle_client_first(b"y,,n=\xff\xfe,r=abc,x=1")
        .is_ok());
    let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
    let too_long = [b"n,,n=,r=".as_slice(), &[b'a'; MAX_MESSAGE_LEN]].concat();
    assert!(server.handle_client_first(&too_long).is_err());
}

/// Runs a real client to the point of its final message.
fn client_final_for(
    password: &str,
    server: &mut ScramServer,
    cb: ChannelBinding,
) -> (ScramSha256, Vec<u8>) {
    let mut client = ScramSha256::new(password.as_bytes(), cb);
    let server_first = server.handle_client_first(client.message()).unwrap();
    client.update(&server_first).unwrap();
    let fin = client.message().to_vec();
    (client, fin)
}

#[test]
fn nonce_bit_flip_is_nonce_mismatch() {
    let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
    let (_, mut fin) = client_final_for("pw", &mut server, ChannelBinding::unsupported());
    // First byte of the nonce value ("c=biws,r=" is 9 bytes); flip to another
    // printable character so the message still parses.
    assert!(fin.starts_with(b"c=biws,r="));
    fin[9] = if fin[9] == b'A' { b'B' } else { b'A' };
    assert_eq!(
        server.handle_client_final(&fin),
        Err(ScramError::NonceMismatch)
    );

    // Truncated nonce (drops the last server-nonce character).
    let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
    let (_, fin) = client_final_for("pw", &mut server, ChannelBinding::unsupported());
    let s = String::from_utf8(fin).unwrap();
    let p = s.find(",p=").unwrap();
    let fin = format!("{}{}", &s[..p - 1], &s[p..]);
    assert_eq!(
        server.handle_client_final(fin.as_bytes()),
        Err(ScramError::NonceMismatch)
    );
}

#[test]
fn channel_binding_flag_must_match() {
    // Client said "y,," (it supports binding, thinks we don't): final must be "eSws".
    let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
    let (mut client, fin) = client_final_for("pw", &mut server, ChannelBinding::unrequested());
    assert!(fin.starts_with(b"c=eSws,"));
    let server_final = server.handle_client_final(&fin).unwrap();
    client.finish(&server_final).unwrap();

    let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
    let (_, fin) = client_final_for("pw", &mut server, ChannelBinding::unsupported());
    let fin = [b"c=eSws".as_slice(), &fin[6..]].concat();
    assert_eq!(
        server.handle_client_final(&fin),
        Err(ScramError::ChannelBindingMismatch)
    );
}

#[test]
fn final_extensions_are_skipped_but_part_of_auth_message() {
    // An extension before p= is covered by the proof, so inserting one
    // after the fact must fail the proof, not be silently accepted.
    let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
    let (_, fin) = client_final_for("pw", &mut server, ChannelBinding::unsupported());
    let s = String::from_utf8(fin).unwrap();
    let p = s.find(",p=").unwrap();
    let fin = format!("{},x=1{}", &s[..p], &s[p..]);
    assert_eq!(
        server.handle_client_final(fin.as_bytes()),
        Err(ScramError::ProofMismatch)
    );
}

#[test]
fn client_final_errors() {
    let cases: &[&[u8]] = &[
        b"",
        b"c=biws",
        b"c=biws,r=NONCE",
        b"c=biws,r=NONCE,p=",
        b"c=biws,r=NONCE,p=AAAA",
        b"c=biws,r=NONCE,p=!!!!",
        b"r=NONCE,c=biws,p=AAAA",
        b"c=biws,r=NONCE,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=,x=1",
        b"c=biws,r=NONCE,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=,",
        b"c=biws,r=NONCE,,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        b"c=biws,r=NONCE,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\0",
    ];
    for input in cases {
        let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
        let first = server.handle_client_first(b"n,,n=,r=abc").unwrap();
        let nonce = &first[2..first.iter().position(|&b| b == b',').unwrap()];
        let input =
            String::from_utf8_lossy(input).replace("NONCE", std::str::from_utf8(nonce).unwrap());
        let err = server.handle_client_final(input.as_bytes()).unwrap_err();
        assert!(matches!(err, ScramError::Malformed(_)), "{input}: {err:?}");
    }
}

#[test]
fn out_of_order_calls() {
    let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
    assert_eq!(
        server.handle_client_final(b"c=biws"),
        Err(ScramError::InvalidState)
    );
    let mut server = ScramServer::from_verifier(cheap_verifier("pw"));
    server.handle_client_first(b"n,,n=,r=abc").unwrap();
    assert_eq!(
        server.handle_client_first(b"n,,n=,r=abc"),
        Err(ScramError::InvalidState)
    );
}

#[test]
fn garbage_never_panics() {
    let mut rng = rand::rng();
    let verifier = cheap_verifier("pw");
    let alphabet = b"nyp,=abcmrsvi019+/AZ\0\xff";
    for i in 0..10_000 {
        let len = rng.random_range(0..64);
        // Half fully random, half from a SCRAM-ish alphabet to get past the first checks.
        let garbage: Vec<u8> = (0..len)
            .map(|_| {
                if i % 2 == 0 {
                    rng.random()
                } else {
                    alphabet[rng.random_range(0..alphabet.len())]
                }
            })
            .collect();

        let mut server = ScramServer::from_verifier(verifier.clone());
        let _ = server.handle_client_first(&garbage);
        let _ = server.handle_client_final(&garbage);

        let mut server = ScramServer::from_verifier(verifier.clone());
        server.handle_client_first(b"n,,n=,r=abc").unwrap();
        assert!(server.handle_client_final(&garbage).is_err());
    }
}

#[test]
fn mutated_messages_never_panic() {
    let mut rng = rand::rng();
    let verifier = cheap_verifier("pw");
    for _ in 0..2_000 {
        let mut server = ScramServer::from_verifier(verifier.clone());
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let mut first = client.message().to_vec();
        let mutate_first = rng.random_bool(0.5);
        if mutate_first {
            mutate(&mut rng, &mut first);
        }
        let Ok(server_first) = server.handle_client_first(&first) else {
            continue;
        };
        if client.update(&server_first).is_err() {
            continue;
        }
        let mut fin = client.message().to_vec();
        if !mutate_first {
            mutate(&mut rng, &mut fin);
        }
        let _ = server.handle_client_final(&fin);
    }
}

fn mutate(rng: &mut impl Rng, msg: &mut Vec<u8>) {
    match rng.random_range(0..4) {
        0 if !msg.is_empty() => {
            let i = rng.random_range(0..msg.len());
            msg[i] ^= 1 << rng.random_range(0..8);
        }
        1 => msg.truncate(rng.random_range(0..=msg.len())),
        2 => {
            let i = rng.random_range(0..=msg.len());
            msg.insert(i, b",=p\0"[rng.random_range(0..4)]);
        }
        _ if !msg.is_empty() => {
            msg.remove(rng.random_range(0..msg.len()));
        }
        _ => {}
    }
}
