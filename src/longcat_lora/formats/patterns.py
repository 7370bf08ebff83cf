"""PEFT's `rank_pattern` / `alpha_pattern` lookup, exact and in bounded time.

PEFT (0.21, `peft.utils.other.get_pattern_key`) gives a module the value of the first key, in the
config's order, for which `re.match(rf"(.*\\.)?({key})$", module)` succeeds: the key is a regular
expression that must match a dotted suffix of the module path (or all of it). Done that way, a config
with thousands of keys costs a regex compile per key per module, and one key like `(a|aa)+b` backtracks
exponentially. This module gives the same answer in bounded time:

- a *plain* key (no regex metacharacter other than `.`: the module paths our own writer emits and the
  suffixes people write by hand, like `attn.qkv`) is found through a trie of the keys, walked once per
  dotted suffix of the module name, with PEFT's reading of `.` as "any character" kept exactly;
- any other key is parsed (Python's own regex parser, on PEFT's full pattern) into an automaton that is
  run as a lazily built DFA: time linear in the module name, never backtracking. Refused, with a
  `LoraError` naming the key: invalid regexes, back-references, look-arounds, word boundaries, inline
  flags, atomic groups and possessive repeats, keys over `MAX_KEY_CHARS` characters, more than
  `MAX_REGEX_KEYS` such keys in one table, or an automaton over `MAX_STATES` states;
- a module name holding a newline is refused when a table is not empty (PEFT's `.` and `$` treat a
  newline specially; real module paths never hold one).

Total work is linear in (module-name characters x regex keys) plus the plain keys' characters; the
trie walk has a budget proportional to the input and refuses, naming the table, past it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import LoraError

try:  # Python >= 3.11
    from re import _constants as C  # type: ignore[attr-defined]
    from re import _parser as P  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as C  # type: ignore[no-redef]
    import sre_parse as P  # type: ignore[no-redef]

import re

META = set("^$*+?{}[]\\|()")  # regex metacharacters other than "."
MAX_REGEX_KEYS = 100
MAX_KEY_CHARS = 1000
MAX_STATES = 5000  # NFA states per key, and DFA states built per key
BUDGET_PER_CHAR = 64  # trie steps allowed per character of input (module names + keys)


def is_plain(key: str) -> bool:
    """A key made of module-path characters and dots only (matched by the trie)."""
    return bool(key) and not (META & set(key))


class PatternTable:
    """One of PEFT's pattern dicts (key -> value), looked up the way PEFT does."""

    def __init__(self, patterns: dict[str, Any], where: str, what: str):
        self.where, self.what = where, what
        self.keys = list(patterns)
        self.values = list(patterns.values())
        self.trie: dict[int, dict] = {}  # key length -> nested dict of chars; leaf "" -> key index
        self.regex: list[tuple[int, _Dfa]] = []  # (key index, matcher), in key order
        self.steps = 0
        self.budget = BUDGET_PER_CHAR * (sum(map(len, self.keys)) + 1)
        for i, key in enumerate(self.keys):
            if not isinstance(key, str):
                raise LoraError(f"{where}: {what} keys must be strings")
            if is_plain(key):
                node = self.trie.setdefault(len(key), {})
                for c in key:
                    node = node.setdefault(c, {})
                node.setdefault("", i)
            else:
                self.regex.append((i, _Dfa(key, where, what)))
        if len(self.regex) > MAX_REGEX_KEYS:
            raise LoraError(f"{where}: {what} has {len(self.regex)} keys that are regular expressions; at most "
                            f"{MAX_REGEX_KEYS} are matched (plain module paths are not limited)")

    def __bool__(self) -> bool:
        return bool(self.keys)

    def lookup(self, module: str) -> Any:
        """The value of the first key matching `module`, or None."""
        if not self.keys:
            return None
        if "\n" in module:
            raise LoraError(f"{self.where}: module {module!r} holds a newline; {self.what} cannot be matched to it")
        self.budget += BUDGET_PER_CHAR * len(module)
        best = self._plain(module)
        for i, dfa in self.regex:
            if i >= best:
                break
            if dfa.match(module):
                best = i
                break
        return None if best == len(self.keys) else self.values[best]

    def _plain(self, module: str) -> int:
        """Smallest index of a plain key matching a dotted suffix of `module` (len(keys) if none)."""
        best = len(self.keys)
        if not self.trie:
            return best
        starts = [0] + [j + 1 for j, c in enumerate(module) if c == "."]
        for s in starts:
            root = self.trie.get(len(module) - s)
            if root is None:
                continue
            stack = [(root, s)]
            while stack:
                node, j = stack.pop()
                self.steps += 1
                if j == len(module):
                    best = min(best, node.get("", best))
                    continue
                c = module[j]
                nxt = node.get(c)
                if nxt is not None:
                    stack.append((nxt, j + 1))
                if c != "." and c != "\n":  # PEFT reads a key's "." as any character
                    nxt = node.get(".")
                    if nxt is not None:
                        stack.append((nxt, j + 1))
            if self.steps > self.budget:
                raise LoraError(f"{self.where}: {self.what} has too many keys that differ only where they have "
                                f"dots to be matched in bounded time")
        return best


# ------------------------------------------------------------------ regex keys: NFA -> lazy DFA

_CHAR, _SPLIT, _BEGIN, _END, _ACCEPT = range(5)


class _Dfa:
    """`re.match(rf"(.*\\.)?({key})$", name) is not None`, decided without backtracking."""

    def __init__(self, key: str, where: str, what: str):
        self.key, self.where, self.what = key, where, what
        if len(key) > MAX_KEY_CHARS:
            self._refuse(f"is over {MAX_KEY_CHARS} characters")
        pattern = rf"(.*\.)?({key})$"
        try:
            parsed = P.parse(pattern)
            re.compile(pattern)  # what PEFT does with it: anything Python refuses is refused here too
        except (re.error, RecursionError, OverflowError, ValueError) as e:
            self._refuse(f"is not a valid regular expression ({str(e).splitlines()[0][:80]})")
        if parsed.state.flags & ~(C.SRE_FLAG_UNICODE):
            self._refuse("sets regex flags")
        self.kind: list[int] = []
        self.arg: list[Any] = []  # _CHAR: (predicate, next); _SPLIT: [nexts]; _BEGIN/_END: next
        accept = self._add(_ACCEPT, None)
        try:
            self.start = self._seq(list(parsed), accept)
        except RecursionError:
            self._refuse("is nested too deeply")
        self.states: dict[frozenset[int], int] = {}
        self.sets: list[frozenset[int]] = []
        self.accepting: list[bool] = []
        self.trans: list[dict[str, int]] = []
        self.init = self._state(self._closure([self.start], begin=True))

    def _refuse(self, why: str) -> None:
        raise LoraError(f"{self.where}: {self.what} key {self.key[:80]!r} {why}; give module paths "
                        f"(or plain regular expressions) instead")

    # construction ---------------------------------------------------------------------------
    def _add(self, kind: int, arg: Any) -> int:
        if len(self.kind) >= MAX_STATES:
            self._refuse(f"needs more than {MAX_STATES} automaton states")
        self.kind.append(kind)
        self.arg.append(arg)
        return len(self.kind) - 1

    def _seq(self, items: list, nxt: int) -> int:
        for op, av in reversed(items):
            nxt = self._node(op, av, nxt)
        return nxt

    def _node(self, op: Any, av: Any, nxt: int) -> int:
        if op is C.LITERAL:
            ch = chr(av)
            return self._add(_CHAR, (lambda c: c == ch, nxt))
        if op is C.NOT_LITERAL:
            ch = chr(av)
            return self._add(_CHAR, (lambda c: c != ch, nxt))
        if op is C.ANY:
            return self._add(_CHAR, (lambda c: c != "\n", nxt))
        if op is C.IN:
            return self._add(_CHAR, (self._charset(av), nxt))
        if op is C.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                self._refuse("sets regex flags")
            return self._seq(list(sub), nxt)
        if op is C.BRANCH:
            return self._add(_SPLIT, [self._seq(list(alt), nxt) for alt in av[1]])
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):  # greedy or lazy: the same yes/no answer
            lo, hi, sub = av
            if lo > MAX_STATES or (hi != C.MAXREPEAT and hi > MAX_STATES):
                self._refuse(f"repeats something more than {MAX_STATES} times")
            sub = list(sub)
            if hi == C.MAXREPEAT:
                loop = self._add(_SPLIT, [])
                self.arg[loop] = [self._seq(sub, loop), nxt]
                tail = loop
            else:
                tail = nxt
                for _ in range(hi - lo):
                    tail = self._add(_SPLIT, [self._seq(sub, tail), nxt])
            for _ in range(lo):
                tail = self._seq(sub, tail)
            return tail
        if op is C.AT:
            if av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
                return self._add(_BEGIN, nxt)
            if av in (C.AT_END, C.AT_END_STRING):  # the same here: names hold no newline
                return self._add(_END, nxt)
        self._refuse(f"uses {str(op).lower()} {'(' + str(av).lower() + ')' if op is C.AT else ''}".rstrip())
        raise AssertionError  # unreachable

    def _charset(self, items: list) -> Callable[[str], bool]:
        negate = False
        tests: list[Callable[[str], bool]] = []
        cats = {C.CATEGORY_DIGIT: str.isdecimal, C.CATEGORY_SPACE: str.isspace,
                C.CATEGORY_WORD: lambda c: c.isalnum() or c == "_"}
        for op, av in items:
            if op is C.NEGATE:
                negate = True
            elif op is C.LITERAL:
                tests.append(lambda c, ch=chr(av): c == ch)
            elif op is C.RANGE:
                tests.append(lambda c, lo=av[0], hi=av[1]: lo <= ord(c) <= hi)
            elif op is C.CATEGORY and av in cats:
                tests.append(cats[av])
            elif op is C.CATEGORY and av in (C.CATEGORY_NOT_DIGIT, C.CATEGORY_NOT_SPACE, C.CATEGORY_NOT_WORD):
                f = cats[{C.CATEGORY_NOT_DIGIT: C.CATEGORY_DIGIT, C.CATEGORY_NOT_SPACE: C.CATEGORY_SPACE,
                          C.CATEGORY_NOT_WORD: C.CATEGORY_WORD}[av]]
                tests.append(lambda c, f=f: not f(c))
            else:
                self._refuse(f"uses {str(op).lower()} in a character class")
        return lambda c: any(t(c) for t in tests) != negate

    # matching -------------------------------------------------------------------------------
    def _closure(self, todo: list[int], begin: bool, end: bool = False) -> frozenset[int]:
        """States reachable without consuming a character: char states, pending `$`, accept."""
        seen: set[int] = set()
        out: set[int] = set()
        while todo:
            s = todo.pop()
            if s in seen:
                continue
            seen.add(s)
            k = self.kind[s]
            if k == _SPLIT:
                todo.extend(self.arg[s])
            elif k == _BEGIN:
                if begin:
                    todo.append(self.arg[s])
            elif k == _END:
                if end:
                    todo.append(self.arg[s])
                else:
                    out.add(s)
            else:
                out.add(s)
        return frozenset(out)

    def _state(self, states: frozenset[int]) -> int:
        i = self.states.get(states)
        if i is None:
            if len(self.sets) >= MAX_STATES:
                self._refuse(f"needs more than {MAX_STATES} matcher states on these module names")
            i = self.states[states] = len(self.sets)
            self.sets.append(states)
            self.accepting.append(any(self.kind[s] == _ACCEPT for s in states))
            self.trans.append({})
        return i

    def match(self, name: str) -> bool:
        d = self.init
        for c in name:
            if self.accepting[d]:
                return True  # re.match: a match need not reach the end (a key may bypass the "$")
            t = self.trans[d]
            n = t.get(c)
            if n is None:
                nxt = [self.arg[s][1] for s in self.sets[d] if self.kind[s] == _CHAR and self.arg[s][0](c)]
                n = t[c] = self._state(self._closure(nxt, begin=False))
            d = n
            if not self.sets[d]:
                return False
        if self.accepting[d]:
            return True
        ends = [self.arg[s] for s in self.sets[d] if self.kind[s] == _END]
        return any(self.kind[s] == _ACCEPT for s in self._closure(ends, begin=not name, end=True))


__all__ = ["PatternTable", "is_plain", "MAX_REGEX_KEYS", "MAX_KEY_CHARS", "MAX_STATES"]
