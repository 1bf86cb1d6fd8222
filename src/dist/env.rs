//! Where a process stands in a distributed job, read from the launcher's environment as PyTorch's
//! `env://` does: torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`,
//! `TORCHELASTIC_USE_AGENT_STORE`), `vtp launch` (the same variables) or Slurm's `srun` (`SLURM_PROCID`,
//! `SLURM_NTASKS`, `SLURM_LOCALID`, with `MASTER_ADDR` defaulting to `SLURM_LAUNCH_NODE_IPADDR`).
use anyhow::{bail, Context, Result};
use std::collections::HashMap;

/// The default rendezvous port (torchrun's).
pub const DEFAULT_PORT: u16 = 29500;

/// One process's place in the job.
#[derive(Debug, Clone, PartialEq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    /// The rank among this machine's processes (picks the GPU).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun already serves the store on `MASTER_PORT`: every rank, 0 included, is a client.
    pub agent_store: bool,
}

impl DistEnv {
    /// The job this process belongs to, from the process environment; `None` when it runs alone
    /// (no launcher variables, or a world of one).
    pub fn from_process() -> Result<Option<Self>> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// As [`Self::from_process`], from the given variables.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Option<Self>> {
        let get = |k: &str| vars.get(k).map(String::as_str);
        let (rank_var, world_var, local_var) = if get("WORLD_SIZE").is_some() {
            ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        } else if get("SLURM_NTASKS").is_some() && get("SLURM_PROCID").is_some() {
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
        } else {
            return Ok(None);
        };
        let number = |k: &str| -> Result<usize> {
            let v = get(k).with_context(|| format!("{world_var} is set but {k} is not"))?;
            v.trim().parse().with_context(|| format!("{k}={v:?} is not a non-negative integer"))
        };
        let world_size = number(world_var)?;
        if world_size <= 1 {
            return Ok(None);
        }
        let rank = number(rank_var)?;
        if rank >= world_size {
            bail!("{rank_var}={rank} is outside the world of {world_size} processes ({world_var})");
        }
        let local_rank = if get(local_var).is_some() { number(local_var)? } else { 0 };
        let master_addr = get("MASTER_ADDR")
            .or_else(|| get("SLURM_LAUNCH_NODE_IPADDR"))
            .context("MASTER_ADDR is not set (the address of rank 0's machine)")?
            .to_string();
        let master_port = match get("MASTER_PORT") {
            Some(p) => p.trim().parse().with_context(|| format!("MASTER_PORT={p:?} is not a port number"))?,
            None => DEFAULT_PORT,
        };
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        Ok(Some(Self { rank, world_size, local_rank, master_addr, master_port, agent_store }))
    }

    /// Whether this process serves the rendezvous store (rank 0, unless torchrun's agent does).
    pub fn serves_store(&self) -> bool {
        self.rank == 0 && !self.agent_store
    }

    /// Whether the job runs on this machine only (the store is on a loopback address).
    pub fn is_loopback(&self) -> bool {
        self.master_addr == "localhost" || self.master_addr.starts_with("127.") || self.master_addr == "::1"
    }
}
