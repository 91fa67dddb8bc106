//! `imago keygen`: a new fleet key pair for sealed jobs (Private Mode). Workers get the secret key file
//! (`--fleet-key`), clients the public one (`imago submit --seal --fleet-key`).

use std::path::PathBuf;

use clap::Args;
use imago::private::seal::generate_key_files;

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Folder for the key files (created if missing); existing files are never overwritten.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: KeygenArgs) -> anyhow::Result<()> {
    let files = generate_key_files(&args.out)?;
    println!("{}", files.secret.display());
    println!("{}", files.public.display());
    eprintln!(
        "key {}: give workers the secret key (--fleet-key {}), clients the public key ({})",
        files.key_id,
        files.secret.display(),
        files.public.display()
    );
    Ok(())
}
