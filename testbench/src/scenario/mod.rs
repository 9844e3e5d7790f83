//! Scenario files (TOML) and their runner. See docs/testbench.md for the format.
//!
//! The rooms: `values` (closed sets and structured strings steps take),
//! `defaults` (what left-out keys are),
//! `schema` (the file and one type per step kind), `label` (how steps read in
//! reports), `matrix` (cases from axes), `validate` (checks across a case),
//! `load` (files into cases, with `FILE:LINE` errors), `case` (a case's state
//! while it runs), `steps` (what each kind does), `run` (one case, end to end).

mod case;
mod defaults;
mod label;
mod load;
mod matrix;
mod run;
mod schema;
mod steps;
mod validate;
mod values;

pub use load::{load, parse, Problem, Scenario};
pub use run::{run, BUILD_CHECK};
pub use schema::json_schema;

#[cfg(test)]
mod tests;
