//! Both relays inside the test process, through the library's shells: sockets the test binds,
//! a shutdown and a reload the test fires, counters the test reads, no log scraped. The
//! real-process suites (relay_e2e, faults, conformance, tunnels) stay the product's proof;
//! this is where a relay's behaviour is checked through its own state.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ntp_dtls::cli::{ClientArgs, DaemonArgs, ServerArgs};
use ntp_dtls::config::{ClientConfig, ServerConfig};
use ntp_dtls::ops::daemon::{Reload, Shutdown};
use ntp_dtls::ops::observe::Observatory;
use ntp_dtls::pki::{LabPkiRequest, generate_lab_pki};
use ntp_dtls::proto::stats::Counter;
use ntp_dtls::relay::client::BoundTunnel;
use ntp_dtls::relay::udp::DatagramSocket;
use ntp_dtls::relay::{client, server};

use common::{TempDir, ntp_query};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn daemon_args() -> DaemonArgs {
    DaemonArgs {
        metrics: None,
        user: None,
        busy_poll_us: None,
        check: false,
    }
}

#[test]
fn both_relays_in_process_serve_and_stop_on_a_manual_shutdown() {
    let dir = TempDir::new();
    generate_lab_pki(&LabPkiRequest {
        out_dir: dir.path().to_path_buf(),
        server_names: vec!["localhost".into()],
        client_names: vec![],
        days: 1,
        force: false,
        key_type: Default::default(),
    })
    .expect("lab PKI");

    // The server relay: builtin time source, one worker, a socket the test binds through the
    // shell's own bind.
    let server_config = ServerConfig::from_args(&ServerArgs {
        daemon: daemon_args(),
        config: None,
        listen: Some("127.0.0.1:0".into()),
        upstream: Some("builtin".into()),
        cert: Some(dir.join("server.pem")),
        key: Some(dir.join("server.key.pem")),
        client_ca: None,
        stratum: Some(3),
        workers: Some(1),
        no_timestamp_correction: false,
        revocation: Default::default(),
    })
    .expect("server config");
    let sockets = server::bind(&server_config).expect("bind");
    let server_addr: SocketAddr = sockets[0].local_addr().expect("addr");
    let server_obs = Arc::new(Observatory::new("server", 1));
    let (stop_server, server_shutdown) = Shutdown::manual();
    let (_, server_reload) = Reload::manual();
    let server_thread = {
        let obs = server_obs.clone();
        std::thread::spawn(move || {
            runtime().block_on(server::serve(
                server_config,
                sockets,
                obs,
                server_shutdown,
                server_reload,
            ))
        })
    };

    // The client relay, one tunnel, its local socket bound here.
    let client_config = ClientConfig::from_args(&ClientArgs {
        daemon: daemon_args(),
        config: None,
        listen: Some("127.0.0.1:0".into()),
        server: Some(server_addr.to_string()),
        server_name: Some("localhost".into()),
        ca: Some(dir.join("ca.pem")),
        cert: None,
        key: None,
        no_timestamp_correction: false,
        revocation: Default::default(),
    })
    .expect("client config");
    let client_obs = Arc::new(Observatory::new("client", 1));
    let (stop_client, client_shutdown) = Shutdown::manual();
    let (local_tx, local_rx) = std::sync::mpsc::channel();
    let client_thread = {
        let obs = client_obs.clone();
        std::thread::spawn(move || {
            runtime().block_on(async move {
                let mut bound = Vec::new();
                for settings in client_config.tunnels {
                    let local = DatagramSocket::bind(settings.listen).expect("local socket");
                    let _ = local_tx.send(local.local_addr().expect("addr"));
                    bound.push(BoundTunnel {
                        settings,
                        local,
                        busy_poll: client_config.daemon.busy_poll,
                    });
                }
                let (_reloads, reloaded) = tokio::sync::mpsc::unbounded_channel();
                tokio::task::LocalSet::new()
                    .run_until(client::serve(bound, obs, client_shutdown, reloaded, "off"))
                    .await;
            })
        })
    };
    let local = local_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the client relay's local address");

    // Requests through the chain until the association is up, then ten answered in a row.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ntp_query(local, Duration::from_millis(200)).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the chain never answered"
        );
    }
    for _ in 0..10 {
        let sample = ntp_query(local, Duration::from_secs(2)).expect("a reply");
        assert_eq!(sample.reply.stratum, 3, "the builtin source's stratum");
    }

    stop_client.fire();
    client_thread.join().expect("client thread");
    stop_server.fire();
    server_thread
        .join()
        .expect("server thread")
        .expect("served without error");

    let (client_stats, server_stats) = (&client_obs.stats, &server_obs.stats);
    let replies = client_stats.get(Counter::RepliesDelivered);
    assert!(replies >= 11, "{replies}");
    assert_eq!(
        client_stats.get(Counter::RequestsForwarded),
        server_stats.get(Counter::RequestsForwarded),
        "every request the client relay sent was answered by the builtin source"
    );
    assert_eq!(client_stats.get(Counter::AssociationsEstablished), 1);
    assert_eq!(server_stats.get(Counter::AssociationsEstablished), 1);
    // The client relay's shutdown closed its association with close_notify, which the server
    // relay saw before it stopped.
    assert_eq!(client_stats.get(Counter::AssociationsClosed), 1);
    assert_eq!(server_stats.get(Counter::AssociationsClosed), 1);
    assert_eq!(
        client_stats.get(Counter::KeepaliveAcks),
        1,
        "the discovery keepalive"
    );
    assert_eq!(server_stats.get(Counter::KeepaliveAcks), 1);
}
