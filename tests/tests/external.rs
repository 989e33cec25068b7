//! A program outside this workspace builds on `shoal-client` alone (one
//! dependency line, plus tokio for its runtime) and runs against a cluster:
//! the quickstart example, as a new user would copy it.

use std::path::PathBuf;
use std::process::Command;

use shoal_tests::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_outside_the_workspace_builds_on_shoal_client_alone() {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("uses-shoal");
    std::fs::create_dir_all(project.join("src")).unwrap();
    std::fs::write(
        project.join("Cargo.toml"),
        format!(
            r#"[package]
name = "uses-shoal"
version = "0.1.0"
edition = "2021"

[dependencies]
shoal-client = {{ path = "{}" }}
tokio = {{ version = "1", features = ["macros", "rt-multi-thread"] }}

[workspace]
"#,
            workspace.join("client").display()
        ),
    )
    .unwrap();
    std::fs::copy(workspace.join("client/examples/quickstart.rs"), project.join("src/main.rs")).unwrap();
    // The workspace's lock file pins the versions already downloaded here
    // (the build is offline).
    std::fs::copy(workspace.join("Cargo.lock"), project.join("Cargo.lock")).unwrap();
    // Its own target directory, kept between runs like the workspace's.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .with_file_name("external-target");
    let t = std::time::Instant::now();
    let out = Command::new(env!("CARGO"))
        .args(["build", "--offline", "--quiet"])
        .current_dir(&project)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo build: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("built a project on shoal-client alone in {:?}", t.elapsed());

    let cluster = TestCluster::start(tmp.path().join("cluster").as_path(), 3, 1).await.unwrap();
    let out = tokio::process::Command::new(target.join("debug/uses-shoal"))
        .env("SHOAL_MS", &cluster.servers[0].addr)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("quickstart OK"), "{stdout}");
}
