//! `imago models`: what is installed and where weights are looked for.

use clap::Args;
use imago::diffusion::hub::HubOptions;
use imago::diffusion::schedulers::SchedulerKind;

#[derive(Debug, Args)]
pub struct ModelsArgs {}

pub fn run(_args: ModelsArgs) -> anyhow::Result<()> {
    let hub = HubOptions::from_env();
    println!("hub cache: {}{}", hub.cache_dir.display(), if hub.offline { " (offline)" } else { "" });
    let mut found = 0;
    if let Ok(entries) = std::fs::read_dir(&hub.cache_dir) {
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                e.file_name().to_str().and_then(|n| n.strip_prefix("models--")).map(|n| n.replacen("--", "/", 1))
            })
            .collect();
        names.sort();
        for name in names {
            println!("  {name}");
            found += 1;
        }
    }
    if found == 0 {
        println!("  (no cached models)");
    }
    println!("families: SD 1.x, SD 2.x (v-prediction), SD-Turbo, SDXL, SDXL-Turbo — read from each folder's configs");
    let names: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
    println!("schedulers: {}", names.join(", "));
    Ok(())
}
