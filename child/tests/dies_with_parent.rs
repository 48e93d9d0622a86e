//! A child started through `hvx_child::spawn` dies when its starter process is
//! SIGKILLed (no clean-up code runs then): this test binary runs itself as the
//! starter, kills it, and looks for the grandchild.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HELPER: &str = "HVX_CHILD_TEST_STARTER";

/// Not a test on its own: the starter role, run only by the test below.
#[test]
fn starter_role() {
    if std::env::var_os(HELPER).is_none() {
        return;
    }
    // From a thread that ends at once, as a tokio blocking thread would.
    let child = std::thread::spawn(|| {
        let mut c = Command::new("sleep");
        c.arg("120");
        hvx_child::spawn(c).expect("spawn")
    })
    .join()
    .expect("thread");
    println!("CHILD {}", child.id());
    let mut child = child;
    // The test kills this process long before the sleep ends.
    let _ = child.wait();
}

#[test]
fn child_dies_when_its_starter_is_killed() {
    let mut starter = Command::new(std::env::current_exe().expect("self"))
        .args(["--exact", "starter_role", "--nocapture", "--test-threads=1"])
        .env(HELPER, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starter");
    let out = starter.stdout.take().expect("stdout");
    let pid: u32 = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            // libtest prints "test starter_role ... " on the same line.
            l.split("CHILD ").nth(1).and_then(|p| p.trim().parse().ok())
        })
        .expect("the starter printed its child's pid");
    let child = hvx_child::ProcId::of(pid).expect("child runs");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.is_alive(),
        "the child died with the thread that started it"
    );
    starter.kill().expect("SIGKILL the starter");
    let _ = starter.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while child.is_alive() {
        if Instant::now() > deadline {
            let _ = hvx_child::kill_and_wait(&child, Duration::from_secs(1));
            panic!("child {pid} outlived its SIGKILLed starter");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
