"""SPMoE multi-output generation: pattern heads over a shared seq2seq, baselines, pair data, the job.

``SPMoE(backbone, SPMoEConfig(patterns=K))`` trains by hard EM over K linear pattern heads with a
balanced gate over each (source, target) pair, and ``generate`` returns K outputs per source.
"""

from moekit.patterns.baselines import HardMixture, SingleModel
from moekit.patterns.spmoe import PairGate, PatternHeads, SourcePrior, SPMoE, SPMoEConfig

__all__ = ["HardMixture", "PairGate", "PatternHeads", "SPMoE", "SPMoEConfig", "SingleModel", "SourcePrior"]
