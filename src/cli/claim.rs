//! `vtp claim`: the paper's claim at small scale ([`crate::experiments::claim`]).
use super::fid::InceptionArgs;
use crate::experiments::claim::{self, Plan};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `vtp claim`.
#[derive(Args, Debug)]
pub struct ClaimArgs {
    /// Experiment folder (continued when it exists).
    #[arg(long, short = 'o', default_value = "runs/claim")]
    out: PathBuf,
    /// The CI-sized form of the same experiment (tiny budgets and sample counts, minutes).
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    inception: InceptionArgs,
}

/// Runs the experiment (or its quick form) in --out.
pub fn claim(a: &ClaimArgs) -> Result<()> {
    let inception = a.inception.path().context(crate::eval::inception::WEIGHTS_HELP)?;
    claim::run(&a.out, &Plan::new(a.quick), inception)
}
