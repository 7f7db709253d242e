//! Wing & Gong's linearizability search with Lowe's memoisation, for one register.
//!
//! Input: one key's ops with interned values ([`SearchOp`]). Output: a [`Verdict`]. The ops'
//! call and return events form a doubly linked list sorted by time. Walking the list, the search
//! reaches a call: if the register model accepts that op from the current state, the op is
//! linearized (its call and return are lifted out of the list, the old state pushed on a stack)
//! and the walk restarts from the head. It reaches a return: the op returning there was not
//! linearized although its deadline has come, so the last choice is undone (popped, unlifted)
//! and the walk resumes just after it. The search succeeds once every op with a deadline is
//! linearized: ops of unknown outcome still left can all take effect last, or never.

use std::collections::HashMap;

/// A register value as the search sees it: `None` = absent, `Some(id)` = an interned string.
pub(crate) type Value = Option<u32>;

/// What one op does to the register, and what its outcome demands of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// A read that returned this value.
    Read(Value),
    /// A write, acknowledged or not: always possible.
    Write(u32),
    /// A compare-and-set; `swapped` is `None` when the outcome is unknown.
    Cas {
        expected: Value,
        new: u32,
        swapped: Option<bool>,
    },
}

impl Step {
    /// The state after this step from `state`, or `None` if the step's outcome is impossible
    /// there.
    pub(crate) fn apply(&self, state: Value) -> Option<Value> {
        match *self {
            Step::Read(seen) => (seen == state).then_some(state),
            Step::Write(new) => Some(Some(new)),
            Step::Cas {
                expected,
                new,
                swapped,
            } => match (state == expected, swapped) {
                (true, Some(true) | None) => Some(Some(new)),
                (false, Some(false) | None) => Some(state),
                _ => None,
            },
        }
    }
}

/// One op of one key, ready for the search.
#[derive(Clone, Debug)]
pub(crate) struct SearchOp {
    pub call_ns: u64,
    /// `u64::MAX` for ops whose outcome is unknown: they have no deadline.
    pub return_ns: u64,
    pub step: Step,
}

/// How the search ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Linearizable,
    NotLinearizable(Blocked),
    /// More than the budget of distinct configurations was needed; undecided.
    OutOfBudget,
}

/// Where a failed search got stuck.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Blocked {
    /// The op (index into the search's input) whose return the search never got past: the
    /// earliest-completing op such that the ops completed by then have no linearization.
    pub culprit: usize,
    /// Register states left by the configurations that placed every op returning before the
    /// culprit and then got stuck at the culprit's return: what the register could hold when
    /// the culprit had to have taken effect. At most [`STATES_KEPT`]. Configurations whose
    /// last placed op has an unknown outcome are left out: they only say that a timed-out
    /// write could have landed just then, which is noise in a report.
    pub states_at_deadline: Vec<Value>,
    /// True if there were more such states than were kept.
    pub more_states: bool,
    /// True if some configurations were left out because an unknown op was placed last.
    pub unknown_landings: bool,
}

/// How many states at the culprit's deadline to keep, for reports.
pub(crate) const STATES_KEPT: usize = 6;

/// Decides whether `ops` are linearizable, exploring at most `budget` distinct configurations.
pub(crate) fn search(ops: &[SearchOp], budget: usize) -> Verdict {
    Search::new(ops).run(budget)
}

const HEAD: usize = 0;
const NIL: usize = usize::MAX;

/// Call and return events, sorted by time, in an index-based doubly linked list. Node 0 is the
/// head sentinel; nodes keep their sorted position as their index, so a larger node index
/// means a later event.
struct EventList {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// The op each node belongs to (unused for the head).
    op: Vec<usize>,
    /// For call nodes, the node of the matching return.
    return_node: Vec<Option<usize>>,
}

impl EventList {
    fn new(ops: &[SearchOp]) -> Self {
        // (time, is_return, op): at equal times calls sort first, so touching ops are concurrent.
        let mut events: Vec<(u64, bool, usize)> = (0..ops.len())
            .flat_map(|i| [(ops[i].call_ns, false, i), (ops[i].return_ns, true, i)])
            .collect();
        events.sort_unstable();
        let nodes = events.len() + 1;
        let mut list = EventList {
            next: (1..=nodes)
                .map(|n| if n == nodes { NIL } else { n })
                .collect(),
            prev: (0..nodes).map(|n| n.wrapping_sub(1)).collect(),
            op: vec![usize::MAX; nodes],
            return_node: vec![None; nodes],
        };
        let mut call_node = vec![0; ops.len()];
        for (position, &(_, is_return, op)) in events.iter().enumerate() {
            let node = position + 1;
            list.op[node] = op;
            if is_return {
                list.return_node[call_node[op]] = Some(node);
            } else {
                call_node[op] = node;
            }
        }
        list
    }

    fn first(&self) -> usize {
        self.next[HEAD]
    }

    /// Removes a call node and its return node. Only [`EventList::unlift`] in LIFO order may
    /// undo this: the removed nodes keep their old links for it.
    fn lift(&mut self, call: usize) {
        let ret = self.return_node[call].expect("only call nodes are lifted");
        for node in [call, ret] {
            self.next[self.prev[node]] = self.next[node];
            if self.next[node] != NIL {
                self.prev[self.next[node]] = self.prev[node];
            }
        }
    }

    fn unlift(&mut self, call: usize) {
        let ret = self.return_node[call].expect("only call nodes are lifted");
        for node in [ret, call] {
            self.next[self.prev[node]] = node;
            if self.next[node] != NIL {
                self.prev[self.next[node]] = node;
            }
        }
    }
}

/// A node of the search tree: which ops are linearized, and the register state.
struct Configuration {
    /// One bit per op with a deadline, then one word holding the state: the cache key.
    definite: Vec<u64>,
    /// One bit per op without a deadline (outcome unknown).
    unknown: Vec<u64>,
    state: Value,
    /// For each op: whether it has a deadline, and its bit in `definite` or `unknown`.
    slots: Vec<(bool, usize)>,
    definite_left: usize,
}

impl Configuration {
    fn new(ops: &[SearchOp]) -> Self {
        let (mut definite, mut unknown) = (0, 0);
        let slots: Vec<(bool, usize)> = (ops.iter())
            .map(|op| {
                let counter = if op.return_ns == u64::MAX {
                    &mut unknown
                } else {
                    &mut definite
                };
                *counter += 1;
                (op.return_ns != u64::MAX, *counter - 1)
            })
            .collect();
        let mut configuration = Configuration {
            definite: vec![0; definite.div_ceil(64) + 1],
            unknown: vec![0; unknown.div_ceil(64)],
            state: None,
            slots,
            definite_left: definite,
        };
        configuration.set_state(None);
        configuration
    }

    fn set_state(&mut self, state: Value) {
        self.state = state;
        *self
            .definite
            .last_mut()
            .expect("the state word is always there") = state.map_or(u64::MAX, u64::from);
    }

    fn toggle(&mut self, op: usize) {
        let (has_deadline, slot) = self.slots[op];
        let words = if has_deadline {
            &mut self.definite
        } else {
            &mut self.unknown
        };
        words[slot / 64] ^= 1 << (slot % 64);
    }

    fn linearize(&mut self, op: usize, state: Value) {
        self.toggle(op);
        self.definite_left -= usize::from(self.slots[op].0);
        self.set_state(state);
    }

    fn undo(&mut self, op: usize, state: Value) {
        self.toggle(op);
        self.definite_left += usize::from(self.slots[op].0);
        self.set_state(state);
    }
}

/// Lowe's cache, extended for ops without a deadline: configurations known to have no
/// successful completion.
///
/// Invariants. (1) A configuration determines the rest of the search: the event list left after
/// lifting a set of ops is the same whatever order they were lifted in, and the model's future
/// answers depend only on the state. (2) A configuration is recorded only when the search
/// backtracks out of it, having tried every op it could linearize next, so a recorded
/// configuration truly has no completion (by induction on the order of recording). (3) If
/// (definite set D, unknown set U, state s) has no completion, neither has (D, U', s) for any
/// U' containing U: a completion of the latter, followed by the ops of U' minus U (always
/// accepted, and observed by nobody once placed last), would complete the former. So entering
/// a configuration dominated by a recorded one can be skipped without losing a
/// linearization; this keeps unknown-outcome ops, which can be placed in many ways, from
/// multiplying the work.
#[derive(Default)]
struct FailedConfigurations {
    /// Keyed by the definite bits and state, so a lookup borrows the current configuration;
    /// each holds the minimal unknown sets recorded with it.
    unknown_sets: HashMap<Box<[u64]>, Vec<Box<[u64]>>>,
}

impl FailedConfigurations {
    fn dominate(&self, configuration: &Configuration) -> bool {
        (self.unknown_sets.get(configuration.definite.as_slice())).is_some_and(|sets| {
            sets.iter()
                .any(|set| is_subset(set, &configuration.unknown))
        })
    }

    fn record(&mut self, configuration: &Configuration) {
        let sets = self
            .unknown_sets
            .entry(configuration.definite.clone().into_boxed_slice())
            .or_default();
        sets.retain(|set| !is_subset(&configuration.unknown, set));
        sets.push(configuration.unknown.clone().into_boxed_slice());
    }
}

fn is_subset(small: &[u64], large: &[u64]) -> bool {
    small
        .iter()
        .zip(large)
        .all(|(small, large)| small & !large == 0)
}

/// Which calls a walk over the list tries. Every walk from the head tries the ops with a
/// deadline first and the unknown-outcome ops only in a second walk, so a configuration that
/// places fewer unknown ops is explored, and recorded as failed, before those placing more,
/// which it then dominates (see [`FailedConfigurations`]). Without this order, a few dozen
/// timed-out writes make a failing search exponential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Definite,
    Unknown,
}

struct Search<'a> {
    ops: &'a [SearchOp],
    list: EventList,
    configuration: Configuration,
    /// For each op linearized on the current path, in order: its call node and the state
    /// before it.
    stack: Vec<(usize, Value)>,
    failed: FailedConfigurations,
    /// Configurations entered so far, counted against the budget.
    entered: usize,
    /// The latest return node the search has been stuck at (0 = none yet).
    furthest_block: usize,
    /// States at the furthest block, as in [`Blocked`].
    states_at_block: Vec<Value>,
    more_states: bool,
    unknown_landings: bool,
}

impl<'a> Search<'a> {
    fn new(ops: &'a [SearchOp]) -> Self {
        Search {
            ops,
            list: EventList::new(ops),
            configuration: Configuration::new(ops),
            stack: Vec::with_capacity(ops.len()),
            failed: FailedConfigurations::default(),
            entered: 0,
            furthest_block: HEAD,
            states_at_block: Vec::new(),
            more_states: false,
            unknown_landings: false,
        }
    }

    fn run(mut self, budget: usize) -> Verdict {
        let (mut node, mut pass) = (self.list.first(), Pass::Definite);
        // Done once every op with a deadline is placed: the rest may all come last or never.
        while self.configuration.definite_left > 0 {
            (node, pass) = if self.list.return_node[node].is_some() {
                if self.pass_of(node) != pass || !self.try_linearize(node) {
                    (self.list.next[node], pass)
                } else if self.entered > budget {
                    return Verdict::OutOfBudget;
                } else {
                    (self.list.first(), Pass::Definite)
                }
            } else if pass == Pass::Definite && !self.configuration.unknown.is_empty() {
                (self.list.first(), Pass::Unknown)
            } else {
                self.note_block(node);
                match self.backtrack() {
                    Some(call) => (self.list.next[call], self.pass_of(call)),
                    None => return Verdict::NotLinearizable(self.blocked()),
                }
            };
        }
        Verdict::Linearizable
    }

    fn pass_of(&self, call: usize) -> Pass {
        match self.ops[self.list.op[call]].return_ns {
            u64::MAX => Pass::Unknown,
            _ => Pass::Definite,
        }
    }

    /// Linearizes the op whose call is `node` next, if the model allows it there and the
    /// resulting configuration is not known to fail.
    fn try_linearize(&mut self, node: usize) -> bool {
        let op = self.list.op[node];
        let state = self.configuration.state;
        if self.is_redundant(op, state) {
            return false;
        }
        let Some(next_state) = self.ops[op].step.apply(state) else {
            return false;
        };
        self.configuration.linearize(op, next_state);
        if self.failed.dominate(&self.configuration) {
            self.configuration.undo(op, state);
            return false;
        }
        self.stack.push((node, state));
        self.list.lift(node);
        self.entered += 1;
        true
    }

    /// True if linearizing `op` next is never needed, because any linearization doing so can
    /// be rewritten into one that does not by moving an unknown-outcome op to the end (where
    /// it is the same as never happening):
    /// * an unknown compare-and-set that would not swap changes nothing where it is placed;
    /// * a write right after an unknown op hides that op's effect before anything observed it.
    ///
    /// Without these, a failing search would try every subset of the pending unknown ops.
    fn is_redundant(&self, op: usize, state: Value) -> bool {
        match self.ops[op].step {
            Step::Cas {
                expected,
                swapped: None,
                ..
            } => expected != state,
            Step::Write(_) => {
                (self.stack.last()).is_some_and(|&(call, _)| self.pass_of(call) == Pass::Unknown)
            }
            Step::Read(_) | Step::Cas { .. } => false,
        }
    }

    /// Records the current configuration as failed and undoes the latest linearization;
    /// returns its call node, or `None` if there is none.
    fn backtrack(&mut self) -> Option<usize> {
        self.failed.record(&self.configuration);
        let (call, state) = self.stack.pop()?;
        self.configuration.undo(self.list.op[call], state);
        self.list.unlift(call);
        Some(call)
    }

    /// Remembers the latest return node the search got stuck at, and the states it was stuck
    /// in there.
    fn note_block(&mut self, node: usize) {
        if node > self.furthest_block {
            self.furthest_block = node;
            self.states_at_block.clear();
            self.more_states = false;
            self.unknown_landings = false;
        }
        if node < self.furthest_block {
            return;
        }
        if (self.stack.last()).is_some_and(|&(call, _)| self.pass_of(call) == Pass::Unknown) {
            self.unknown_landings = true;
            return;
        }
        let state = self.configuration.state;
        if self.states_at_block.contains(&state) {
            return;
        }
        if self.states_at_block.len() < STATES_KEPT {
            self.states_at_block.push(state);
        } else {
            self.more_states = true;
        }
    }

    fn blocked(self) -> Blocked {
        let culprit = self.list.op[self.furthest_block];
        Blocked {
            culprit,
            states_at_deadline: self.states_at_block,
            more_states: self.more_states,
            unknown_landings: self.unknown_landings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call_ns: u64, return_ns: u64, step: Step) -> SearchOp {
        SearchOp {
            call_ns,
            return_ns,
            step,
        }
    }

    #[test]
    fn cas_step_follows_its_outcome() {
        let swap = |swapped| Step::Cas {
            expected: Some(1),
            new: 2,
            swapped,
        };
        assert_eq!(swap(Some(true)).apply(Some(1)), Some(Some(2)));
        assert_eq!(swap(Some(true)).apply(None), None);
        assert_eq!(swap(Some(false)).apply(Some(1)), None);
        assert_eq!(swap(Some(false)).apply(Some(3)), Some(Some(3)));
        assert_eq!(swap(None).apply(Some(1)), Some(Some(2)));
        assert_eq!(swap(None).apply(Some(3)), Some(Some(3)));
    }

    #[test]
    fn lift_and_unlift_restore_the_list() {
        let ops = [op(0, 10, Step::Write(1)), op(5, 15, Step::Read(Some(1)))];
        let mut list = EventList::new(&ops);
        let before = (list.next.clone(), list.prev.clone());
        let call = list.first();
        list.lift(call);
        assert_eq!(
            list.op[list.first()],
            1,
            "the second op's call is now first"
        );
        list.unlift(call);
        assert_eq!((list.next.clone(), list.prev.clone()), before);
    }

    #[test]
    fn read_overlapping_a_write_may_see_either_value() {
        for seen in [None, Some(1)] {
            let ops = [op(0, 10, Step::Write(1)), op(5, 15, Step::Read(seen))];
            assert_eq!(search(&ops, 100), Verdict::Linearizable);
        }
    }

    #[test]
    fn stuck_search_names_the_earliest_impossible_op() {
        let ops = [
            op(0, 10, Step::Write(1)),
            op(20, 30, Step::Read(None)),
            op(40, 50, Step::Read(Some(1))),
        ];
        let Verdict::NotLinearizable(blocked) = search(&ops, 100) else {
            panic!("a read of nil after a completed write is not linearizable");
        };
        let expected = Blocked {
            culprit: 1,
            states_at_deadline: vec![Some(1)],
            more_states: false,
            unknown_landings: false,
        };
        assert_eq!(blocked, expected);
    }
}
