//! How long a dumped full script takes to apply over netlink, in a
//! private network namespace: compile (script -> one nf_tables batch)
//! and send (the kernel's transaction) apart.
//! `TRELLIS_DUMP=/tmp/s.nft cargo run --release -p trellis-proxy --example memory -- 30000`
//! then `cargo run --release -p trellis-proxy --example applytime -- /tmp/s.nft` (root).

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: applytime SCRIPT");
        std::process::exit(2);
    };
    let text = std::fs::read_to_string(&path).expect("read the script");
    // this process's own namespace: nothing of the host's is touched
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root?)");
    let t = std::time::Instant::now();
    let (batch, lines) =
        trellis_dataplane::nftnl::compile(&text, &trellis_proxy::script::decl_of).expect("compile");
    let compiled = t.elapsed();
    let t = std::time::Instant::now();
    trellis_dataplane::nftnl::send(&batch, &lines, std::time::Duration::from_secs(120))
        .expect("send");
    println!(
        "compile_ms={} send_ms={} batch_mb={:.1}",
        compiled.as_millis(),
        t.elapsed().as_millis(),
        batch.len() as f64 / 1e6
    );
}
