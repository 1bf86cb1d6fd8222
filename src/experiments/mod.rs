//! Experiments: drivers that run `vtp` stages as child processes and gather their typed reports
//! into tables and plots.
pub mod claim;
