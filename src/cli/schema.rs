//! `imago schema`: the JSON Schemas of the job, result and progress messages.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Write `*.schema.json` files into this folder instead of printing the job schema.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: SchemaArgs) -> anyhow::Result<()> {
    let schemas = imago::job::json_schemas();
    match args.out {
        None => {
            for (name, schema) in schemas {
                println!("// {name}\n{}", serde_json::to_string_pretty(&schema)?);
            }
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, schema) in schemas {
                let path = dir.join(name);
                std::fs::write(&path, serde_json::to_string_pretty(&schema)? + "\n")
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("{}", path.display());
            }
        }
    }
    Ok(())
}
