"""The gap laboratory: controlled sweeps showing how the modality gap forms and what bridges it.

Examples:
    >>> from modalign.lab import GapSetting, quick_config
    >>> [s.name for s in quick_config().settings][:2]
    ['xavier-d1-learned-e20', 'xavier-d1-tau0.01-e20']
"""

from modalign.geometry.gapshift import gap_shift_curve, gap_vector, shift_along_gap
from modalign.lab.answer import QUESTION, answer
from modalign.lab.measure import LabTowers, SpaceData, measure_space
from modalign.lab.misalign import Misalignment, measure_misalignment, plateau_step
from modalign.lab.settings import (
    GapSetting,
    LabConfig,
    full_config,
    full_settings,
    heads_settings,
    medium_config,
    medium_settings,
    quick_config,
    quick_settings,
)
from modalign.lab.sweep import LabResult, data_store, run_gap_lab, run_quick_lab, summarize
from modalign.lab.trend import TrendTest, spearman, trend_test, verdict

__all__ = [
    "QUESTION",
    "GapSetting",
    "LabConfig",
    "LabResult",
    "LabTowers",
    "Misalignment",
    "SpaceData",
    "TrendTest",
    "answer",
    "data_store",
    "full_config",
    "full_settings",
    "gap_shift_curve",
    "gap_vector",
    "heads_settings",
    "measure_misalignment",
    "measure_space",
    "medium_config",
    "medium_settings",
    "plateau_step",
    "quick_config",
    "quick_settings",
    "run_gap_lab",
    "run_quick_lab",
    "shift_along_gap",
    "spearman",
    "summarize",
    "trend_test",
    "verdict",
]
