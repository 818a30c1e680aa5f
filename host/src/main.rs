fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap();
    let t = std::time::Instant::now();
    let m = kvgate::engine::LoadedModel::load(std::path::Path::new(&path), None)?;
    eprintln!("load {:?}", t.elapsed());
    let f = if std::env::var("DECODE_ONLY").is_ok() { kvgate::bench::engine(&m, &[], 3, 128)? } else { kvgate::bench::engine(&m, &[512, 2048], 3, 128)? };
    println!("{f:?}");
    Ok(())
}
