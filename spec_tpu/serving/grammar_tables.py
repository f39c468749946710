"""Which compiled grammar each automaton table of the engine's pool holds (the host's side of
decode.GrammarPool; the engine thread alone uses it).

Slots whose requests bring one grammar (the same key: regex and vocabulary) share its table.
A table no slot uses keeps its grammar until another grammar needs the room, least recently
used first, so a schema that comes back is not written again. A request whose grammar finds
no table free waits in the queue, as it would for a slot.
"""

from __future__ import annotations


class GrammarTables:
  """num_tables tables, numbered 1..num_tables (class map 0 is the pool's unconstrained one)."""

  def __init__(self, num_tables: int):
    self.num_tables = num_tables
    self._keys: list[str | None] = [None] * num_tables
    self._users = [0] * num_tables
    self._last_used = [0] * num_tables
    self._unwritten: set[int] = set()
    self._clock = 0
    self.writes = 0  # grammars written to the device so far

  @property
  def in_use(self) -> int:
    """Tables some live request uses."""
    return sum(u > 0 for u in self._users)

  def _find(self, key: str) -> int | None:
    return self._keys.index(key) if key in self._keys else None

  def acquire(self, key: str) -> int | None:
    """The table for one more request with this grammar (None: every table is used by other
    grammars). A new table must be written (`take_write`) before the request runs."""
    i = self._find(key)
    if i is None:
      free = [j for j in range(self.num_tables) if self._users[j] == 0]
      if not free:
        return None
      i = min(free, key=lambda j: self._last_used[j])
      self._keys[i] = key
      self._unwritten.add(i)
    self._users[i] += 1
    self._clock += 1
    self._last_used[i] = self._clock
    return i + 1

  def take_write(self, table: int) -> bool:
    """Whether `table` still needs its grammar written (True once: the caller writes it)."""
    if table - 1 not in self._unwritten:
      return False
    self._unwritten.discard(table - 1)
    self.writes += 1
    return True

  def release(self, table: int) -> None:
    """One request using `table` finished."""
    if self._users[table - 1] <= 0:
      raise RuntimeError(f"grammar table {table} released more often than acquired")
    self._users[table - 1] -= 1
