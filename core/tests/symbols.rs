//! Mappings, build IDs and symbolisation, checked against this test executable itself and
//! against binutils (`readelf`, `nm`, `objcopy`): the tools a person would check them with.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use onsite_core::pprof::{PprofBuilder, decode, function_totals, sample_stacks, symbolize_offline};
use onsite_core::symbols::{Mappings, Symbolizer};

#[inline(never)]
fn a_function_with_a_known_name() -> Vec<usize> {
    let mut ips = Vec::new();
    backtrace::trace(|frame| {
        ips.push(frame.ip() as usize);
        true
    });
    std::hint::black_box(ips)
}

fn exe() -> PathBuf {
    std::fs::read_link("/proc/self/exe").expect("/proc/self/exe")
}

fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The build ID `readelf -n` prints for `path`.
fn readelf_build_id(path: &Path) -> String {
    let notes = tool("readelf", &["-n", path.to_str().unwrap()]);
    let line = notes.lines().find_map(|l| l.trim().strip_prefix("Build ID: ")).expect("a build ID note");
    line.trim().to_owned()
}

/// The profile a child builds from its own stack, under `ONSITE_SYMBOLS_TEST_OUT`.
fn profile_of_own_stack() -> Vec<u8> {
    let ips = a_function_with_a_known_name();
    let mut builder = PprofBuilder::new(&[("samples", "count")], ("samples", "count"), 1)
        .skip_leaf_frames(|f| f.starts_with("backtrace::"));
    builder.add_addresses(&ips, &[7], &[]);
    let mut bytes = Vec::new();
    builder.write_gzip(&mut bytes).unwrap();
    bytes
}

#[test]
fn this_executable_is_mapped_with_the_build_id_readelf_reads() {
    let exe = exe();
    let mappings = Mappings::of_this_process();
    let own: Vec<_> = mappings.iter().filter(|m| Path::new(&m.path) == exe).collect();
    assert_eq!(own.len(), 1, "one executable mapping for the test binary: {mappings:?}");
    assert_eq!(own[0].build_id.as_deref(), Some(readelf_build_id(&exe).as_str()));
    assert!(mappings.iter().any(|m| m.object_name().starts_with("libc.so")), "libc is mapped too: {mappings:?}");

    // A function's runtime address lands in that mapping, at the object address `nm` lists.
    let runtime = a_function_with_a_known_name as fn() -> Vec<usize> as usize as u64;
    let (_, mapping) = mappings.find(runtime).expect("the function is in a mapping");
    assert_eq!(Path::new(&mapping.path), exe);
    let resolved = Symbolizer::new().resolve(mapping, runtime);
    let symbols = tool("nm", &["--defined-only", exe.to_str().unwrap()]);
    let nm_address = symbols
        .lines()
        .find(|l| l.contains("a_function_with_a_known_name"))
        .and_then(|l| u64::from_str_radix(l.split_whitespace().next()?, 16).ok())
        .expect("nm lists the function");
    assert_eq!(resolved.object_address, Some(nm_address), "file offset → object address through the segments");
    assert!(resolved.frames.iter().any(|f| f.function.ends_with("a_function_with_a_known_name")), "{resolved:?}");
}

#[test]
fn a_profile_of_this_executable_has_real_mappings_and_no_address_zero() {
    let profile = decode(&profile_of_own_stack()).unwrap();
    let s = |i: i64| profile.string_table[i as usize].as_str();
    let exe = exe();
    let main = &profile.mapping[0];
    assert_eq!(Path::new(s(main.filename)), exe, "the program's mapping comes first");
    assert_eq!(s(main.build_id), readelf_build_id(&exe));
    assert!(main.memory_start > 0 && main.memory_limit > main.memory_start && main.memory_limit != u64::MAX);
    assert!(main.has_functions && main.has_filenames && main.has_line_numbers, "debug info names all: {main:?}");
    for location in &profile.location {
        assert_ne!(location.address, 0, "{location:?}");
        let mapping = profile.mapping.iter().find(|m| m.id == location.mapping_id).expect("every address is mapped");
        assert!((mapping.memory_start..mapping.memory_limit).contains(&location.address), "{location:?}");
    }
    let top = function_totals(&profile, "samples").unwrap();
    assert!(top[0].function.ends_with("a_function_with_a_known_name"), "{top:?}");
    assert_eq!(top[0].flat, 7);
}

/// Runs by `a_stripped_copy_names_nothing_wrong_and_is_named_offline_by_build_id`, in a stripped
/// copy of this executable.
#[test]
#[ignore = "run by a_stripped_copy_names_nothing_wrong_and_is_named_offline_by_build_id"]
fn child_writes_a_profile_of_its_own_stack() {
    let Some(out) = std::env::var_os("ONSITE_SYMBOLS_TEST_OUT") else { return };
    std::fs::write(out, profile_of_own_stack()).unwrap();
}

#[test]
fn a_stripped_copy_names_nothing_wrong_and_is_named_offline_by_build_id() {
    let dir = tempfile::tempdir().unwrap();
    let exe = exe();
    let name = exe.file_name().unwrap();
    let stripped_dir = dir.path().join("stripped");
    std::fs::create_dir(&stripped_dir).unwrap();
    let stripped = stripped_dir.join(name);
    tool("objcopy", &["--strip-all", exe.to_str().unwrap(), stripped.to_str().unwrap()]);
    assert!(!tool("readelf", &["-S", stripped.to_str().unwrap()]).contains(".symtab"));

    let out = dir.path().join("profile.pb.gz");
    let mut child = Command::new(&stripped)
        .args(["--exact", "child_writes_a_profile_of_its_own_stack", "--ignored", "--test-threads=1"])
        .env("ONSITE_SYMBOLS_TEST_OUT", &out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the stripped child did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());

    let mut profile = decode(&std::fs::read(&out).unwrap()).unwrap();
    let s = |p: &onsite_core::pprof::proto::Profile, i: i64| p.string_table[i as usize].clone();
    let main = profile.mapping[0].clone();
    assert_eq!(Path::new(&s(&profile, main.filename)), stripped);
    assert_eq!(s(&profile, main.build_id), readelf_build_id(&exe), "strip keeps the build ID");
    assert!(!main.has_functions && !main.has_filenames && !main.has_line_numbers, "{main:?}");
    let prefix = format!("{}+0x", name.to_str().unwrap());
    let (leaf_stack, _) = &sample_stacks(&profile)[0];
    assert!(leaf_stack.iter().any(|f| f.starts_with(&prefix)), "unnamed frames are object+offset: {leaf_stack:?}");
    assert!(
        !leaf_stack.iter().any(|f| f.contains("a_function_with_a_known_name")),
        "a stripped binary never names the function: {leaf_stack:?}"
    );

    // Offline, the unstripped executable (same build ID) names it.
    let wrong_dir = dir.path().join("wrong");
    std::fs::create_dir(&wrong_dir).unwrap();
    std::fs::copy("/bin/true", wrong_dir.join(name)).unwrap();
    let named = symbolize_offline(&mut profile, std::slice::from_ref(&wrong_dir));
    assert_eq!(named, 0, "a file of another build ID names nothing");
    let named = symbolize_offline(&mut profile, &[wrong_dir, exe.parent().unwrap().to_path_buf()]);
    assert!(named > 0);
    let top = function_totals(&profile, "samples").unwrap();
    assert!(top.iter().any(|t| t.function.ends_with("a_function_with_a_known_name") && t.cum == 7), "{top:?}");
}

/// A package upgrade replaces a loaded library by renaming a new file over it. The mapping
/// keeps the build ID of the build that runs (read from memory), and the new file, whose
/// build ID differs, names nothing: an address is named by the loaded code or left unnamed,
/// never named after whatever the new file has at that offset.
#[test]
fn a_library_replaced_on_disk_keeps_its_loaded_build_id_and_is_not_misnamed() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libreplaced.so");
    std::fs::copy("/lib/x86_64-linux-gnu/libm.so.6", &lib).expect("libm to load a copy of");
    let loaded_id = readelf_build_id(&lib);
    let path = std::ffi::CString::new(lib.to_str().unwrap()).unwrap();
    // SAFETY: a valid path; the copy stays loaded for the rest of this test process.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen of the copy failed");
    // SAFETY: a valid handle and symbol name.
    let hypot = unsafe { libc::dlsym(handle, c"hypot".as_ptr()) } as u64;
    assert_ne!(hypot, 0, "hypot in the copy of libm");
    let address = hypot + 4;
    let name_now = |symbolizer: &mut Symbolizer| {
        let mappings = Mappings::of_this_process();
        let (_, mapping) = mappings.find(address).expect("the copy is mapped");
        let resolved = symbolizer.resolve(mapping, address);
        (mapping.build_id.clone(), resolved.frames.first().map(|f| f.function.clone()))
    };
    let (id_before, name_before) = name_now(&mut Symbolizer::new());
    assert_eq!(id_before.as_deref(), Some(loaded_id.as_str()));
    let name_before = name_before.expect("the loaded copy names its own code");
    assert!(name_before.contains("hypot"), "{name_before}");

    let new = dir.path().join("new.so");
    std::fs::copy("/lib/x86_64-linux-gnu/libc.so.6", &new).unwrap();
    std::fs::rename(&new, &lib).unwrap();
    assert_ne!(readelf_build_id(&lib), loaded_id, "the file at the path is another build now");

    let (id_after, name_after) = name_now(&mut Symbolizer::new());
    assert_eq!(id_after.as_deref(), Some(loaded_id.as_str()), "the build that runs, not the file's");
    assert_eq!(name_after, None, "the replaced file names nothing");
}

/// A symbolisation deadline (a shutdown's budget) can leave some locations of a mapping
/// unnamed after most were named, and the mapping is then marked `has_functions`; the offline
/// symboliser still names the ones left.
#[test]
fn a_location_left_unnamed_in_a_marked_mapping_is_named_offline() {
    let mut profile = decode(&profile_of_own_stack()).unwrap();
    assert!(profile.mapping[0].has_functions, "the program's mapping is marked");
    let known = profile
        .function
        .iter()
        .find(|f| profile.string_table[f.name as usize].ends_with("a_function_with_a_known_name"))
        .expect("the known function is named")
        .id;
    let location = profile
        .location
        .iter_mut()
        .find(|l| l.line.iter().any(|line| line.function_id == known))
        .expect("a location in the known function");
    // As a deadline leaves it: the address in its mapping, no name.
    location.line.clear();
    let top = function_totals(&profile, "samples").unwrap();
    assert!(!top[0].function.ends_with("a_function_with_a_known_name"), "{top:?}");

    assert!(symbolize_offline(&mut profile, &[]) >= 1, "the unnamed location is named");
    let top = function_totals(&profile, "samples").unwrap();
    assert!(top[0].function.ends_with("a_function_with_a_known_name"), "{top:?}");
    assert_eq!(top[0].flat, 7);
}
