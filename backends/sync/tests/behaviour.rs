//! The lock types behave like parking_lot's (these follow parking_lot's own tests): once with
//! no capture running, and once more in a child process with both captures recording every
//! event, so the recording slow paths are held to the same behaviour.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::channel;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use onsite_core::test_support;
use onsite_core::{ProfileKind, Profiler};
use onsite_sync::{
    BlockProfiler, Condvar, MappedMutexGuard, Mutex, MutexGuard, MutexProfiler, RwLock, RwLockUpgradableReadGuard,
    RwLockWriteGuard,
};

fn try_lock_fails_while_held() {
    let m = Mutex::new(());
    let guard = m.try_lock().expect("free");
    assert!(m.is_locked());
    assert!(m.try_lock().is_none());
    drop(guard);
    assert!(m.try_lock().is_some());
}

fn try_lock_for_times_out_and_succeeds() {
    let m = Arc::new(Mutex::new(0));
    let guard = m.lock();
    let m2 = m.clone();
    let timed_out = thread::spawn(move || m2.try_lock_for(Duration::from_millis(20)).is_none()).join().unwrap();
    assert!(timed_out, "the lock was held throughout");
    let m3 = m.clone();
    let waiter = thread::spawn(move || m3.try_lock_for(Duration::from_secs(10)).map(|mut g| *g += 1).is_some());
    thread::sleep(Duration::from_millis(10));
    drop(guard);
    assert!(waiter.join().unwrap(), "the lock was released well before the timeout");
    assert!(m.try_lock_until(Instant::now() + Duration::from_millis(1)).is_some());
    assert_eq!(*m.lock(), 1);
}

fn lots_and_lots() {
    const J: u32 = 1000;
    const K: u32 = 3;
    let m = Arc::new(Mutex::new(0));
    let (tx, rx) = channel();
    for _ in 0..K {
        for _ in 0..2 {
            let (tx, m) = (tx.clone(), m.clone());
            thread::spawn(move || {
                for _ in 0..J {
                    *m.lock() += 1;
                }
                tx.send(()).unwrap();
            });
        }
    }
    drop(tx);
    for _ in 0..2 * K {
        rx.recv().unwrap();
    }
    assert_eq!(*m.lock(), J * K * 2);
}

fn no_poisoning_after_a_panic_while_locked() {
    let m = Arc::new(Mutex::new(1));
    let m2 = m.clone();
    let result = thread::spawn(move || {
        let _guard = m2.lock();
        panic!("deliberate panic while holding the lock");
    })
    .join();
    assert!(result.is_err());
    assert_eq!(*m.lock(), 1, "the lock is free again and not poisoned");

    let rw = Arc::new(RwLock::new(1));
    let rw2 = rw.clone();
    let _ = thread::spawn(move || {
        let _guard = rw2.write();
        panic!("deliberate panic while holding the write lock");
    })
    .join();
    assert_eq!(*rw.read(), 1);
}

fn mapped_guards_and_into_inner() {
    let m = Mutex::new((1, String::from("a")));
    {
        let mut mapped: MappedMutexGuard<'_, String> = MutexGuard::map(m.lock(), |pair| &mut pair.1);
        mapped.push('b');
    }
    assert!(MutexGuard::try_map(m.lock(), |_| None::<&mut i32>).is_err());
    let mut m = m;
    m.get_mut().0 = 2;
    assert_eq!(m.into_inner(), (2, String::from("ab")));
    static GLOBAL: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    GLOBAL.lock().push(1);
    assert_eq!(GLOBAL.lock().len(), 1);
}

fn unlocked_and_fair_unlock() {
    let m = Mutex::new(0);
    let mut guard = m.lock();
    MutexGuard::unlocked(&mut guard, || assert!(m.try_lock().is_some()));
    *guard += 1;
    MutexGuard::bump(&mut guard);
    MutexGuard::unlock_fair(guard);
    assert_eq!(*m.lock(), 1);
}

/// Threads parked behind the lock get it handed over by fair unlocks and bumps; no update and
/// no wakeup is lost.
fn fair_unlocks_and_bumps_hand_over_to_waiters() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 300;
    let m = Arc::new(Mutex::new(0));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let m = m.clone();
            thread::spawn(move || {
                for _ in 0..ROUNDS {
                    let mut guard = m.lock();
                    *guard += 1;
                    MutexGuard::bump(&mut guard);
                    *guard += 1;
                    MutexGuard::unlock_fair(guard);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(*m.lock(), 2 * THREADS * ROUNDS);
}

/// `notify_all` while the mutex is held requeues the waiters onto the mutex; fair unlocks then
/// hand it to each of them in turn (the Condvar's handoff path).
fn condvar_waiters_requeued_get_the_lock_by_fair_unlocks() {
    const N: usize = 4;
    // (waiting, released, done)
    let data = Arc::new((Mutex::new((0, false, 0)), Condvar::new()));
    let threads: Vec<_> = (0..N)
        .map(|_| {
            let data = data.clone();
            thread::spawn(move || {
                let (lock, cond) = &*data;
                let mut state = lock.lock();
                state.0 += 1;
                while !state.1 {
                    cond.wait(&mut state);
                }
                state.2 += 1;
                MutexGuard::unlock_fair(state);
            })
        })
        .collect();
    let (lock, cond) = &*data;
    // A waiter releases the lock only by waiting, so once all have counted themselves under
    // the lock, all are waiting.
    let mut state = lock.lock();
    while state.0 != N {
        MutexGuard::unlocked(&mut state, thread::yield_now);
    }
    state.1 = true;
    assert_eq!(cond.notify_all(), N);
    MutexGuard::unlock_fair(state);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(lock.lock().2, N);
    assert_eq!(cond.notify_all(), 0);
}

fn rwlock_readers_share_writers_exclude() {
    let l = RwLock::new(0);
    let (r1, r2) = (l.read(), l.read());
    assert!(l.try_write().is_none());
    assert!(l.try_read().is_some());
    drop((r1, r2));
    let w = l.write();
    assert!(l.try_read().is_none());
    assert!(l.try_read_for(Duration::from_millis(5)).is_none());
    assert!(l.try_write_for(Duration::from_millis(5)).is_none());
    drop(w);
    assert!(l.try_write_for(Duration::from_millis(5)).is_some());
}

fn rwlock_upgradable_reads() {
    let l = RwLock::new(1);
    {
        let upgradable = l.upgradable_read();
        assert!(l.try_read().is_some(), "readers share with an upgradable read");
        assert!(l.try_upgradable_read().is_none(), "one upgradable read at a time");
        assert!(l.try_write().is_none());
        let mut w = RwLockUpgradableReadGuard::upgrade(upgradable);
        *w += 1;
        assert!(l.try_read().is_none());
        let upgradable = RwLockWriteGuard::downgrade_to_upgradable(w);
        assert_eq!(*upgradable, 2);
        let r = RwLockUpgradableReadGuard::downgrade(upgradable);
        assert!(l.try_upgradable_read().is_some());
        drop(r);
    }
    let w = l.write();
    let r = RwLockWriteGuard::downgrade(w);
    assert!(l.try_write().is_none());
    assert!(l.try_read().is_some());
    drop(r);

    // An upgrade waits for the other readers to leave; try_upgrade_for gives up on time.
    let l = Arc::new(RwLock::new(0));
    let reader = l.read();
    let upgradable = l.upgradable_read();
    let upgradable = match RwLockUpgradableReadGuard::try_upgrade_for(upgradable, Duration::from_millis(10)) {
        Ok(_) => panic!("upgraded while a reader held the lock"),
        Err(upgradable) => upgradable,
    };
    drop(upgradable);
    let l2 = l.clone();
    let upgrader = thread::spawn(move || {
        let upgradable = l2.upgradable_read();
        let mut w = RwLockUpgradableReadGuard::upgrade(upgradable);
        *w += 1;
    });
    thread::sleep(Duration::from_millis(10));
    drop(reader);
    upgrader.join().unwrap();
    assert_eq!(*l.read(), 1);
}

fn rwlock_frob() {
    const N: usize = 4;
    const M: usize = 1000;
    let l = Arc::new(RwLock::new(0usize));
    let writes = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..N)
        .map(|t| {
            let (l, writes) = (l.clone(), writes.clone());
            thread::spawn(move || {
                for i in 0..M {
                    if (i + t) % N == 0 {
                        *l.write() += 1;
                        writes.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let _ = *l.read();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(*l.read(), writes.load(Ordering::Relaxed));
}

fn condvar_notify_one() {
    let pair = Arc::new((Mutex::new(false), Condvar::new()));
    let pair2 = pair.clone();
    let mut ready = pair.0.lock();
    let t = thread::spawn(move || {
        *pair2.0.lock() = true;
        assert!(pair2.1.notify_one(), "a thread was waiting");
    });
    while !*ready {
        pair.1.wait(&mut ready);
    }
    drop(ready);
    t.join().unwrap();
    assert!(!Condvar::new().notify_one());
}

fn condvar_notify_all() {
    const N: usize = 5;
    let data = Arc::new((Mutex::new(0), Condvar::new()));
    let (tx, rx) = channel();
    for _ in 0..N {
        let (data, tx) = (data.clone(), tx.clone());
        thread::spawn(move || {
            let (lock, cond) = &*data;
            let mut count = lock.lock();
            *count += 1;
            if *count == N {
                tx.send(()).unwrap();
            }
            while *count != 0 {
                cond.wait(&mut count);
            }
            tx.send(()).unwrap();
        });
    }
    drop(tx);
    let (lock, cond) = &*data;
    rx.recv().unwrap();
    let mut count = lock.lock();
    *count = 0;
    assert_eq!(cond.notify_all(), N);
    drop(count);
    for _ in 0..N {
        rx.recv().unwrap();
    }
    assert_eq!(cond.notify_all(), 0);
}

fn condvar_wait_for_times_out_and_wakes() {
    let pair = Arc::new((Mutex::new(()), Condvar::new()));
    let mut g = pair.0.lock();
    assert!(pair.1.wait_for(&mut g, Duration::from_millis(1)).timed_out());
    assert!(pair.1.wait_until(&mut g, Instant::now() + Duration::from_millis(1)).timed_out());
    let pair2 = pair.clone();
    let t = thread::spawn(move || {
        let _g = pair2.0.lock();
        pair2.1.notify_one();
    });
    assert!(!pair.1.wait_for(&mut g, Duration::from_secs(3600)).timed_out());
    drop(g);
    t.join().unwrap();

    let m = Mutex::new(0);
    let mut g = m.lock();
    let result = pair.1.wait_while_for(&mut g, |n| *n < 1, Duration::from_millis(5));
    assert!(result.timed_out());
}

const ALL: &[(&str, fn())] = &[
    ("try_lock_fails_while_held", try_lock_fails_while_held),
    ("try_lock_for_times_out_and_succeeds", try_lock_for_times_out_and_succeeds),
    ("lots_and_lots", lots_and_lots),
    ("no_poisoning_after_a_panic_while_locked", no_poisoning_after_a_panic_while_locked),
    ("mapped_guards_and_into_inner", mapped_guards_and_into_inner),
    ("unlocked_and_fair_unlock", unlocked_and_fair_unlock),
    ("fair_unlocks_and_bumps_hand_over_to_waiters", fair_unlocks_and_bumps_hand_over_to_waiters),
    ("condvar_waiters_requeued_get_the_lock_by_fair_unlocks", condvar_waiters_requeued_get_the_lock_by_fair_unlocks),
    ("rwlock_readers_share_writers_exclude", rwlock_readers_share_writers_exclude),
    ("rwlock_upgradable_reads", rwlock_upgradable_reads),
    ("rwlock_frob", rwlock_frob),
    ("condvar_notify_one", condvar_notify_one),
    ("condvar_notify_all", condvar_notify_all),
    ("condvar_wait_for_times_out_and_wakes", condvar_wait_for_times_out_and_wakes),
];

#[test]
fn behaves_like_parking_lot_with_no_capture() {
    for (_, behaviour) in ALL {
        behaviour();
    }
}

#[test]
#[ignore = "child process of behaves_like_parking_lot_while_capturing"]
fn child_behaviour_while_capturing() {
    if test_support::role().as_deref() != Some("behaviour") {
        return;
    }
    let mut mutex = MutexProfiler::new(1);
    let mut block = BlockProfiler::new(Duration::ZERO);
    let (mutex_capture, block_capture) = (mutex.start().unwrap(), block.start().unwrap());
    for (name, behaviour) in ALL {
        tracing::debug!(name, "behaviour while capturing");
        behaviour();
    }
    let out = capture_output(&child_dir());
    mutex_capture.stop(&out).unwrap();
    block_capture.stop(&out).unwrap();
}

#[test]
fn behaves_like_parking_lot_while_capturing() {
    let dir = tempfile::tempdir().unwrap();
    run_child("child_behaviour_while_capturing", "behaviour", dir.path(), Duration::from_secs(30));
    // Recording every event, the block profile saw the waits these behaviours make.
    let block = read_profile(dir.path(), ProfileKind::Block);
    assert!(mentions(&block, "condvar_notify_all"), "{:#?}", top(&block));
}
