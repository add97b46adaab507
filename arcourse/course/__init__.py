"""The course platform, apart from what the chapters teach: run modes, graded exercises and their
scorecard, claims checked by ``make verify``, the authoring pipeline and the notebook widgets.

A chapter needs four names from here::

    from arcourse.course import by_mode, check, claim, mode_banner
"""

from arcourse.course.config import by_mode, is_quick, mode_banner, seed
from arcourse.course.grading import check
from arcourse.course.verify import claim, full_curve, show_full_mode

__all__ = ["by_mode", "check", "claim", "full_curve", "is_quick", "mode_banner", "seed",
           "show_full_mode"]
