"""One module per build step. Each `make(...)` returns a dag.Step (name, version, params,
inputs) and each `run(ctx)` is thin: it reads its inputs, calls the library function and
writes into ctx.out. Library imports happen inside run() so planning needs none of them."""
