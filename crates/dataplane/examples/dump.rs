//! Prints what the dataplane reads back for a device (debugging aid):
//! `ip netns exec NS cargo run --example dump -- DEV`.
use trellis_dataplane::{Dataplane, LinuxDataplane};
fn main() {
    let dev = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "trellis.1".into());
    let dp = LinuxDataplane::new();
    println!("fdb: {:?}", dp.fdb(&dev));
    println!("neighbours: {:?}", dp.neighbours(&dev));
    println!("routes: {:?}", dp.routes_owned());
}
