"""Dispatchers move tokens to experts and back; they know nothing of how routing was decided."""

from moekit.dispatch.capacity import capacity_keep, expert_capacity
from moekit.dispatch.sort import Dispatcher, LocalDispatcher, Permutation, combine, sort_by_expert

__all__ = ["Dispatcher", "LocalDispatcher", "Permutation", "capacity_keep", "combine", "expert_capacity",
           "sort_by_expert"]
