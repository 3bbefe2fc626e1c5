//! What a hook callback gets: the event, the guest, its own hook id, and a few
//! verbs. Not the engine: a callback that could reach every engine field is how
//! HVMI's side channels grew; here the verbs are the whole interface.

use crate::event::EventInfo;
use crate::glue::Guest;
use crate::target::{HookId, Target};
use crate::verdict::Outcome;

/// A hook callback.
pub type Callback = Box<dyn FnMut(&mut Ctx<'_>) -> Outcome + Send>;

/// A hook to add once the running callback returns.
pub(crate) struct NewHook {
    pub(crate) target: Target,
    pub(crate) name: String,
    pub(crate) callback: Callback,
}

/// What callbacks asked for during one dispatch; the engine acts on it.
#[derive(Default)]
pub(crate) struct Requests {
    /// The introcall answer (RBX for the guest).
    pub(crate) introcall: Option<u64>,
    pub(crate) new_hooks: Vec<NewHook>,
}

/// What a callback may use while it runs.
pub struct Ctx<'a> {
    pub guest: &'a mut dyn Guest,
    pub event: &'a EventInfo,
    /// The hook being called.
    pub hook: HookId,
    requests: &'a mut Requests,
}

impl<'a> Ctx<'a> {
    pub(crate) fn new(
        guest: &'a mut dyn Guest,
        event: &'a EventInfo,
        hook: HookId,
        requests: &'a mut Requests,
    ) -> Self {
        Ctx {
            guest,
            event,
            hook,
            requests,
        }
    }

    /// For an introcall hook: the value the guest gets in RBX.
    pub fn answer_introcall(&mut self, value: u64) {
        self.requests.introcall = Some(value);
    }

    /// Adds a hook when this callback returns; the same dispatch calls it if it
    /// matches this event (HVMI: hooks placed by a callback are live at once). A
    /// target the engine refuses (unmapped, outside RAM) is not added.
    pub fn add_hook(&mut self, target: Target, name: impl Into<String>, callback: Callback) {
        self.requests.new_hooks.push(NewHook {
            target,
            name: name.into(),
            callback,
        });
    }
}
