"""The GRIFFIN core: the architectures table, the statistic and top-k, per-layer budgets,
slicing, the closed-form refit, and the hooks that capture a prompt's FF activations.
Pure tensor code apart from the hooks; nothing here reads or writes files."""
