//! The Python module `tensorgate._router`: runs the router inside a Python process so that
//! one `pip install` ships it, with the GIL released for its whole life.

use pyo3::prelude::*;

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
