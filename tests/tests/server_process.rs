//! The `shoal-server` process: refuses unusable data directories with a
//! clear message, and shuts down cleanly on SIGTERM.

use std::process::Command;

use shoal_tests::{server_bin, TestServer};

fn run_server(args: &[&str]) -> (i32, String) {
    let out = Command::new(server_bin()).args(args).output().expect("run shoal-server");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn refuses_a_data_dir_that_is_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let (code, err) = run_server(&["--listen", "127.0.0.1:0", "--data-dir", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not a directory"), "{err}");
}

#[test]
fn refuses_a_foreign_non_empty_dir_and_bad_flags() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("somebody-elses-file"), b"x").unwrap();
    let (code, err) = run_server(&["--listen", "127.0.0.1:0", "--data-dir", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not empty"), "{err}");

    let (code, err) = run_server(&["--listen", "127.0.0.1:0", "--data-dir", "/tmp/x", "--targets", "0"]);
    assert_eq!(code, 1);
    assert!(err.contains("targets"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_dir_is_refused_and_sigterm_is_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s0");
    let mut srv = TestServer::start(&dir, 2).await.unwrap();
    let (code, err) = run_server(&["--listen", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap(), "--targets", "2"]);
    assert_eq!(code, 1);
    assert!(err.contains("in use"), "{err}");

    let (code, err) = {
        let status = srv.terminate().unwrap();
        (status.code(), std::fs::read_to_string(srv.log_path()).unwrap())
    };
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("shoal-server stopped"), "{err}");

    // Restarting with another target count is refused: the layout is fixed.
    let (code, err) = run_server(&["--listen", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap(), "--targets", "3"]);
    assert_eq!(code, 1);
    assert!(err.contains("formatted with 2 targets"), "{err}");
}
