//! Nobody else gets in, and nothing an agent sends leaves its target: certificates from another
//! CA, agents without a target, an agent claiming another's name, hostile paths, symlink
//! escapes and corrupted records — all refused, with the standby and everything outside it
//! untouched. The receiver runs in-process; the "agent" here is a raw gRPC client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lockstep_common::config::{ReceiverConfig, TlsConfig};
use lockstep_common::event::{make_event, Change, FileWrite, FsOp, Seq};
use lockstep_common::proto::agent_message::Msg as AMsg;
use lockstep_common::proto::receiver_message::Msg as RMsg;
use lockstep_common::proto::replication_client::ReplicationClient;
use lockstep_common::proto::{self, AgentMessage};
use lockstep_common::relpath::RelPath;
use lockstep_common::tls::ClientTls;
use tokio_util::sync::CancellationToken;

struct Env {
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    cancel: CancellationToken,
}

impl Env {
    async fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        lockstep_agent::certs::generate(&certs, &["web-1".into(), "eu-west".into(), "mallory".into()], &[]).unwrap();
        lockstep_agent::certs::generate(&dir.path().join("other-ca"), &["web-1".into()], &[]).unwrap();
        let port = lockstep_tests::free_port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let cfg_path = dir.path().join("receiver.toml");
        std::fs::write(
            &cfg_path,
            format!(
                "id = \"eu-west\"\nlisten = \"{addr}\"\ndata_dir = \"rdata\"\nadmin_listen = \"127.0.0.1:{}\"\n\
                 [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/eu-west.pem\"\nkey = \"certs/eu-west.key\"\n\
                 [[targets]]\nagent = \"web-1\"\nsource = \"www\"\nkind = \"fs\"\npath = \"standby\"\n",
                lockstep_tests::free_port()
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/precious"), b"keep me").unwrap();
        let cfg = ReceiverConfig::load(&cfg_path).unwrap();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move { lockstep_receiver::run(cfg, c).await });
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Env { dir, addr, cancel }
    }

    fn standby(&self) -> PathBuf {
        self.dir.path().join("standby")
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    /// The agent side's TLS for a client presenting `certs`/`id`.pem.
    fn client_tls(&self, certs: &str, id: &str) -> ClientTls {
        let d = self.dir.path().join(certs);
        let tls =
            TlsConfig { ca: d.join("ca.pem"), cert: d.join(format!("{id}.pem")), key: d.join(format!("{id}.key")) };
        // Trust the real CA for the server in every case: only the client identity varies.
        let tls = TlsConfig { ca: self.dir.path().join("certs/ca.pem"), ..tls };
        ClientTls::new(&tls, "eu-west", "receiver eu-west").unwrap()
    }

    async fn client(&self, tls: &ClientTls) -> Result<ReplicationClient<tonic::transport::Channel>, String> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_with_connector(tls.connector())
            .await
            .map_err(|e| e.to_string())?;
        Ok(ReplicationClient::new(ch))
    }

    /// Opens a stream, says hello as `agent_id`, sends `events`; returns the first error status
    /// (or Ok with the last ack seq). A TLS refusal is returned as UNAUTHENTICATED with the
    /// message the agent would show.
    async fn session(
        &self,
        certs: &str,
        cert_id: &str,
        agent_id: &str,
        events: Vec<proto::Event>,
    ) -> Result<u64, tonic::Status> {
        let tls = self.client_tls(certs, cert_id);
        match self.session_with(&tls, agent_id, events).await {
            Err(s) => Err(tls.problem().map_or(s, |p| tonic::Status::unauthenticated(p.message))),
            ok => ok,
        }
    }

    async fn session_with(
        &self,
        tls: &ClientTls,
        agent_id: &str,
        events: Vec<proto::Event>,
    ) -> Result<u64, tonic::Status> {
        let mut client = match self.client(tls).await {
            Ok(c) => c,
            Err(e) => return Err(tonic::Status::unavailable(e)),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(AgentMessage {
            msg: Some(AMsg::Hello(proto::Hello {
                protocol_version: lockstep_common::PROTOCOL_VERSION,
                agent_id: agent_id.into(),
                journal_id: vec![1u8; 16].into(),
                sources: vec![proto::SourceInfo { name: "www".into(), kind: proto::SourceKind::Fs as i32 }],
                last_seq: 0,
                epoch: 0,
            })),
        })
        .await
        .unwrap();
        let mut inbound = client.replicate(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        match inbound.message().await? {
            Some(proto::ReceiverMessage { msg: Some(RMsg::Welcome(_)) }) => {}
            other => panic!("expected welcome, got {other:?}"),
        }
        tx.send(AgentMessage { msg: Some(AMsg::Batch(proto::EventBatch { events })) }).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await.expect("receiver answers") {
                Ok(Some(proto::ReceiverMessage { msg: Some(RMsg::Ack(a)) })) => return Ok(a.seq),
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(0),
                Err(s) => return Err(s),
            }
        }
    }
}

fn fs_event(seq: u64, op: proto::fs_change::Op) -> proto::Event {
    let payload = prost::Message::encode_to_vec(&proto::ChangeEvent {
        change: Some(proto::change_event::Change::Fs(proto::FsChange { op: Some(op) })),
    });
    make_event(Seq(seq), "www", lockstep_common::now_us(), payload)
}

fn write_op(path: &str, data: &[u8]) -> proto::Event {
    let op = FsOp::Write(FileWrite {
        path: RelPath::new(path.as_bytes().to_vec()).unwrap(),
        first: true,
        last: true,
        delta: false,
        size: data.len() as u64,
        mode: 0o644,
        mtime_ns: 0,
        blocks: vec![lockstep_common::event::Block { offset: 0, data: data.to_vec().into() }],
        content_hash: Some(*blake3::hash(data).as_bytes()),
        meta: None,
    });
    make_event(Seq(1), "www", 0, Change::Fs(op).encode())
}

fn untouched(outside: &Path) {
    let names: Vec<_> = std::fs::read_dir(outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "something was written outside the target: {names:?}");
    assert_eq!(std::fs::read(outside.join("precious")).unwrap(), b"keep me");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_identities_are_enforced() {
    let env = Env::start().await;
    // A legitimate agent gets in.
    let ok = env.session("certs", "web-1", "web-1", vec![write_op("hello.txt", b"hi")]).await;
    assert_eq!(ok.unwrap(), 1);
    assert_eq!(std::fs::read(env.standby().join("hello.txt")).unwrap(), b"hi");
    // A certificate from another CA never completes the handshake, and the client is told
    // why (TLS 1.3 lets it finish its side first: the verdict comes as an alert).
    let other = env.session("other-ca", "web-1", "web-1", vec![]).await.unwrap_err();
    assert_eq!(other.code(), tonic::Code::Unauthenticated, "{other:?}");
    assert!(other.message().starts_with("unknown CA: receiver eu-west "), "{other:?}");
    assert!(other.message().contains("not signed by the CA in the receiver's tls.ca"), "{other:?}");
    // The receiver keeps serving.
    env.session("certs", "web-1", "web-1", vec![]).await.unwrap();
    // A valid certificate for an agent with no target is refused by name.
    let mallory = env.session("certs", "mallory", "mallory", vec![]).await.unwrap_err();
    assert_eq!(mallory.code(), tonic::Code::PermissionDenied, "{mallory:?}");
    assert!(mallory.message().contains("no target"), "{}", mallory.message());
    // ... and may not claim to be someone else.
    let spoof = env.session("certs", "mallory", "web-1", vec![write_op("spoof.txt", b"x")]).await.unwrap_err();
    assert_eq!(spoof.code(), tonic::Code::PermissionDenied, "{spoof:?}");
    assert!(!env.standby().join("spoof.txt").exists());
    env.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_and_corrupt_records_are_refused() {
    use proto::fs_change::Op;
    let env = Env::start().await;
    let outside = env.outside();
    let hostile = [
        Op::Remove(proto::Remove { path: b"../outside/precious".to_vec().into() }),
        Op::Remove(proto::Remove { path: outside.join("precious").into_os_string().into_encoded_bytes().into() }),
        Op::Mkdir(proto::Mkdir { path: b"a/../../outside/x".to_vec().into(), mode: 0o755, meta: None }),
        Op::Mkdir(proto::Mkdir { path: b"nul\0byte".to_vec().into(), mode: 0o755, meta: None }),
        Op::Rename(proto::Rename { from: b"hello".to_vec().into(), to: b"../outside/stolen".to_vec().into() }),
    ];
    for op in hostile {
        let r = env.session("certs", "web-1", "web-1", vec![fs_event(1, op.clone())]).await;
        let s = r.expect_err(&format!("{op:?} accepted"));
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{op:?}: {s:?}");
        untouched(&outside);
    }
    // A symlink leading out is not created; writing "through" it stays inside the standby.
    let link = fs_event(
        1,
        Op::Symlink(proto::Symlink {
            path: b"evil".to_vec().into(),
            target: outside.clone().into_os_string().into_encoded_bytes().into(),
            meta: None,
        }),
    );
    let mut through = write_op("evil/x", b"payload");
    through.seq = 2;
    env.session("certs", "web-1", "web-1", vec![link, through]).await.unwrap();
    untouched(&outside);
    assert!(!std::fs::symlink_metadata(env.standby().join("evil")).unwrap().file_type().is_symlink());
    // A record whose checksum does not match is refused before anything is applied.
    let mut bad = write_op("corrupt.txt", b"good bytes");
    bad.seq = 3;
    bad.crc32 ^= 0xdead;
    let s = env.session("certs", "web-1", "web-1", vec![bad]).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::DataLoss, "{s:?}");
    assert!(!env.standby().join("corrupt.txt").exists());
    env.cancel.cancel();
}
