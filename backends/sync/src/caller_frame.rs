//! Keeping the unlocking function's frame on the stack that a slow path records.
//!
//! The mutex profile charges a waiter's delay to the stack of the thread that unlocks. In a
//! release build, an unlock that is the last thing a function does (a guard dropped at the end
//! of its scope, `notify_all()` on the last line) is compiled as a *tail call*: the function's
//! frame is popped and the slow path is entered with a `jmp`, so a stack walked inside the slow
//! path starts at the function's *caller* and the function that held the lock is not in the
//! profile at all.
//!
//! [`after_slow_call`] goes right after each call into a recording slow path, in the inlined
//! fast-path functions. It is an empty `asm!` block, which the compiler must assume has effects
//! and must run after the call returns; so the call cannot become a jump, and the caller's frame
//! (with its return address) is still there when the slow path walks the stack. It emits no
//! instruction: the fast path, which never makes the call, costs exactly what it did, and the
//! slow path pays one `ret` it would have shared with the caller.

/// Placed right after a call into a slow path: keeps that call from being a tail call (see the
/// module docs).
#[inline(always)]
pub(crate) fn after_slow_call() {
    // SAFETY: an empty instruction sequence; it touches no memory, no stack, no flags.
    unsafe { std::arch::asm!("", options(nomem, nostack, preserves_flags)) }
}
