//! The Python module `tensorgate._router`: runs the router inside a Python process so that
//! one `pip install` ships it, with the GIL released for its whole life.

use pyo3::prelude::*;

// As the standalone binary (main.rs): the router's own allocations go to mimalloc; Python's
// keep its allocator (a Rust global allocator only serves Rust code).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs the router with command-line style arguments (argv[0] is the program name).
#[pyfunction]
fn run(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(|| crate::run_main(argv))
}

#[pymodule]
fn _router(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(run, m)?)?;
    Ok(())
}
