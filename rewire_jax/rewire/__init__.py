"""The in-context routing optimisation (the paper's cycle).

  options.py    RewireOptions (the paper's defaults, every ambiguity an option), PhaseOutput
  selection.py  layer scores (Eq. 2-3), the selections, the per-layer masked Adam step, split points
  phase.py      one phase: all n Adam steps in one compiled call (`optimise_phase`)
  cycle.py      the cycle, once: CycleState + run_phase (used by Rewirer.step, generate, experiments)
"""
from ..model.loss import sequence_losses
from .cycle import CycleState, Rewirer, bucket_length, check_finite, rewirer, run_phase, start_cycle
from .options import (CHOICES, HYPER, SELECTIONS, NonFiniteDeltas, PhaseOutput, RewireOptions, hyper_array,
                      static_options)
from .phase import _first_step_jit, _steps_jit, optimise_phase
from .selection import (SPLIT_GRID, adam, host_split, init_opt_state, layer_scores, masked_adam_update,
                        num_selected, random_layer_mask, round_split, select_layers, split_grid)

__all__ = ["CHOICES", "CycleState", "HYPER", "NonFiniteDeltas", "PhaseOutput", "RewireOptions", "Rewirer",
           "SELECTIONS", "SPLIT_GRID", "adam", "bucket_length", "check_finite", "host_split", "hyper_array",
           "init_opt_state", "layer_scores", "masked_adam_update", "num_selected", "optimise_phase",
           "random_layer_mask", "rewirer", "round_split", "run_phase", "select_layers", "sequence_losses",
           "split_grid", "start_cycle", "static_options"]
