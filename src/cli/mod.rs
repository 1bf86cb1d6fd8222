//! The `vtp` command line (clap): one sub-command per job, errors printed as one line.
mod bench;
mod claim;
mod clip;
mod data;
mod dist;
mod dit;
mod eval;
mod fid;
mod finetune;
mod images;
mod model_cmds;
mod recon;
mod train;

use crate::config::VtpConfig;
use crate::kernels::Kernels;
use crate::model::VtpModel;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use tch::Device;

/// VTP visual tokenizer: reconstruct, encode, decode, zero-shot classify and inspect images with the
/// released MiniMaxAI/VTP-*-f16d64 checkpoints (or a random model, so everything runs offline).
#[derive(Parser, Debug)]
#[command(name = "vtp", version, about, long_about = None)]
pub struct Cli {
    /// Device: `auto` (CUDA when libtorch has it and a GPU is present, else CPU), `cpu`, `cuda`, `cuda:N`.
    #[arg(long, global = true, default_value = "auto")]
    device: String,
    /// CPU threads for libtorch, at least 1 (default: libtorch's choice).
    #[arg(long, global = true, value_parser = clap::value_parser!(i32).range(1..))]
    threads: Option<i32>,
    /// CPU kernels: `native` (libtorch's pick for this CPU) or `avx2` (oneDNN and ATen capped at AVX2 by
    /// re-executing with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2: bit-identical to an AVX2
    /// machine, e.g. to compare exactly with a reference dump made on one; README "Reference dumps").
    #[arg(long, global = true, default_value = "native")]
    kernels: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Encode and decode images; writes PNGs and prints PSNR per image and on average.
    Reconstruct(recon::ReconstructArgs),
    /// Encode images to 64-channel latents [C, H/16, W/16], one tensor per image in a .safetensors file.
    Encode(recon::EncodeArgs),
    /// Decode every latent tensor of a .safetensors file (as written by `encode`) to PNGs.
    Decode(recon::DecodeArgs),
    /// Zero-shot classification: probability of each label for each image (CLIP, logit scale 100).
    ZeroShot(clip::ZeroShotArgs),
    /// Write encoder features (CLS + patch tokens, last or intermediate layers, CLIP embedding).
    Features(recon::FeaturesArgs),
    /// Print the CLIP BPE token ids of each text, one line per text.
    Tokenize(clip::TokenizeArgs),
    /// Write a randomly initialised model in the released format (config.json + model.safetensors).
    Init(model_cmds::InitArgs),
    /// Run a model on the inputs of a reference dump and compare every output (relative L2 error).
    Check(model_cmds::CheckArgs),
    /// Time `reconstruct` (encode + decode) on random images; prints one JSON line.
    Bench(bench::BenchArgs),
    /// Evaluate a tokenizer: zero-shot (§5.1), linear probing (§5.2), PSNR/SSIM/LPIPS/rFID (§5.3); JSON report.
    Eval(eval::EvalArgs),
    /// Inception statistics (`mu`, `sigma`) of an image folder as a pytorch-fid compatible .npz.
    FidStats(fid::FidStatsArgs),
    /// FID between two image folders or .npz statistics files (as `python -m pytorch_fid A B`).
    Fid(fid::FidArgs),
    /// Convert PyTorch weight files (FID Inception, LPIPS-VGG) to safetensors.
    Convert(fid::ConvertArgs),
    /// Pre-train a VTP tokenizer from scratch: CLIP + DINO/iBOT/KoLeo + L1/LPIPS reconstruction (docs/design.md §4);
    /// `--preset tiny` runs on a laptop CPU in minutes on the built-in synthetic data.
    Pretrain(train::PretrainArgs),
    /// Stage 2: fine-tune a tokenizer's pixel decoder with L1 + LPIPS + a PatchGAN, encoder frozen
    /// (docs/design.md §4.7); exports the whole tokenizer, whose latents are unchanged.
    FinetuneDecoder(finetune::FinetuneArgs),
    /// Generation with LightningDiT on VTP latents (docs/design.md §5.4, §8): extract a latent cache, train by
    /// flow matching, sample, and score FID / sample class accuracy.
    Dit {
        #[command(subcommand)]
        command: dit::DitCommand,
    },
    /// The paper's claim at small scale: `ae` vs `all` tokenizers at several pre-training budgets, the
    /// same DiT on each latent space, FID and sample class accuracy; a table and plots (README).
    Claim(claim::ClaimArgs),
    /// Start N ranks of a `vtp` command on this machine (torchrun's job without Python):
    /// `vtp launch --nproc-per-node 2 -- pretrain --preset tiny --out runs/x`.
    Launch(dist::LaunchArgs),
    /// Check the distributed setup: every collective against its exact result, and the all-reduce
    /// bandwidth (run under `vtp launch`, torchrun or srun).
    DistCheck(dist::DistCheckArgs),
    /// Data sources: export to WebDataset shards, inspect, benchmark the augmentations.
    Data {
        #[command(subcommand)]
        command: data::DataCommand,
    },
}

/// Where the weights come from: `--model` (a directory or `hf:ORG/NAME[@REV]`), else a random preset.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Released-format directory (config.json + model.safetensors) or a Hugging Face id such as
    /// `hf:MiniMaxAI/VTP-Small-f16d64` (resolved through the Hugging Face cache, downloaded when online).
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// Without --model: build a randomly initialised model of this preset (small, base, large).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Seed of the random initialisation (with --preset).
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

impl ModelArgs {
    /// What the report calls this model: the `--model` spec, or the random preset and seed.
    pub fn describe(&self) -> String {
        match &self.model {
            Some(spec) => spec.clone(),
            None => format!("random '{}' (seed {})", self.preset, self.seed),
        }
    }

    /// Loads (or randomly builds) the model on `device`.
    pub fn load(&self, device: Device) -> Result<VtpModel> {
        match &self.model {
            Some(spec) => VtpModel::load(&crate::hub::resolve_model_dir(spec)?, device),
            None => {
                eprintln!("note: no --model given; using a randomly initialised '{}' model", self.preset);
                tch::manual_seed(self.seed);
                VtpModel::new(VtpConfig::preset(&self.preset)?, device)
            }
        }
    }
}

fn parse_device(spec: &str) -> Result<Device> {
    Ok(match spec {
        "auto" => Device::cuda_if_available(),
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => bail!("unknown device '{other}' (expected auto, cpu, cuda or cuda:N)"),
        },
    })
}

/// The first line of an error chain: libtorch errors carry multi-line C++ backtraces.
fn one_line(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    text.lines().next().unwrap_or_default().trim_end().to_string()
}

fn run(cli: Cli) -> Result<()> {
    // Before anything touches libtorch: pinning re-executes the process.
    cli.kernels.parse::<Kernels>()?.apply()?;
    if let Some(n) = cli.threads {
        tch::set_num_threads(n);
    }
    // rayon's pool (crops, image decoding) helps this thread: its kernels stay on its own threads.
    rayon::ThreadPoolBuilder::new()
        .start_handler(|_| crate::kernels::serial_kernels_on_this_thread())
        .build_global()
        .context("cannot start rayon's thread pool")?;
    let device = parse_device(&cli.device)?;
    if let Device::Cuda(_) = device {
        if !tch::Cuda::is_available() {
            bail!("device '{}' requested but no CUDA GPU is available to libtorch", cli.device);
        }
    }
    let _no_grad = tch::no_grad_guard();
    match cli.command {
        Command::Reconstruct(a) => recon::reconstruct(&a, device),
        Command::Encode(a) => recon::encode(&a, device),
        Command::Decode(a) => recon::decode(&a, device),
        Command::Features(a) => recon::features(&a, device),
        Command::ZeroShot(a) => clip::zero_shot(&a, device),
        Command::Tokenize(a) => clip::tokenize(&a),
        Command::Init(a) => model_cmds::init(&a, device),
        Command::Check(a) => model_cmds::check(&a, device),
        Command::Bench(a) => bench::bench(&a, device),
        Command::Data { command } => data::run(&command),
        Command::Dit { command } => dit::run(&command, device),
        Command::Claim(a) => claim::claim(&a),
        Command::Launch(a) => dist::launch(&a),
        Command::DistCheck(a) => dist::dist_check(&a),
        Command::Eval(a) => eval::eval(&a, device),
        Command::FidStats(a) => fid::fid_stats(&a, device),
        Command::Fid(a) => fid::fid(&a, device),
        Command::Convert(a) => fid::convert(&a),
        Command::Pretrain(a) => train::pretrain(&a, device),
        Command::FinetuneDecoder(a) => finetune::finetune_decoder(&a, device),
    }
}

/// A clap usage error on one line: its message and hint lines joined, without the `--help` pointer.
fn usage_error_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("Usage:"))
        .collect();
    lines.join(" ").trim_start_matches("error: ").to_string()
}

/// Entry point of the binary: parses arguments, runs, prints `error: …` on one line; returns the
/// exit code. Panics are reported on one line too, without a backtrace.
pub fn main() -> i32 {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()));
        let msg = msg.unwrap_or_default();
        // libtorch messages carry C++ backtraces after the first (possibly escaped) newline.
        let first = msg.split(['\n']).next().unwrap_or_default().split("\\n").next().unwrap_or_default();
        eprintln!("error: internal error: {first}");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print(); // --help, --version
            return 0;
        }
        Err(e) => {
            eprintln!("error: {}", usage_error_line(&e));
            return e.exit_code();
        }
    };
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("error: {}", one_line(&e));
            1
        }
        Err(_) => 2,
    }
}

/// Output folder helper shared by the commands.
pub(crate) fn out_path(dir: &std::path::Path, stem: &str, ext: &str) -> PathBuf {
    dir.join(format!("{stem}.{ext}"))
}
