"""Stage I planners: compute the target value each edit should write."""

from metake.planners.standard import TargetPlan, compute_targets, context_templates

__all__ = ["TargetPlan", "compute_targets", "context_templates"]
