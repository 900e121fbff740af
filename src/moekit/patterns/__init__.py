"""SPMoE multi-output generation: pattern heads, baselines, pair data and the ``patterns`` job."""
