//! Loading scenario files: the shipped ones load, the matrix expands, and each
//! kind of mistake is one `LINE: …` problem naming what is allowed.

use std::path::Path;

use super::load::{load, parse, Problem};
use super::schema::Step;
use super::values::{KillMode, Target};
use crate::topology::DnsManager;

/// The problems in `text`, as `LINE: message` lines.
fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(cases) => panic!("expected problems, got {} cases", cases.len()),
        Err(p) => p
            .iter()
            .map(|Problem { line, message }| format!("{line}: {message}"))
            .collect(),
    }
}

/// The one problem in `text`.
fn problem(text: &str) -> String {
    let all = problems(text);
    assert_eq!(all.len(), 1, "expected one problem: {all:#?}");
    all.into_iter().next().unwrap_or_default()
}

/// A file's first lines: its name (line 1).
const NAME: &str = "name = 'x'\n";
/// A first step (3 lines).
const START: &str = "[[step]]\ndo = 'start-servers'\n";

#[test]
fn every_shipped_scenario_loads() {
    let files = shipped();
    assert!(!files.is_empty());
    for (path, _) in files {
        let cases = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!cases.is_empty());
    }
}

/// The scenario files shipped in scenarios/, with their text.
fn shipped() -> Vec<(std::path::PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn the_json_schema_in_docs_is_current_and_accepts_every_shipped_file() {
    let kept = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/scenario.schema.json");
    let generated = super::json_schema();
    assert_eq!(
        std::fs::read_to_string(&kept).unwrap_or_default(),
        generated,
        "docs/scenario.schema.json is stale: run `cargo run -p testbench -- schema --out docs/scenario.schema.json`"
    );
    let schema: serde_json::Value = serde_json::from_str(&generated).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for (path, text) in shipped() {
        let file: serde_json::Value = toml::from_str(&text).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&file)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
    }
    // And it is not vacuous: a bad word fails, a matrix placeholder passes.
    let step = |signal: &str| serde_json::json!({"name": "x", "step": [{"do": "stop-client", "signal": signal}]});
    assert!(!validator.is_valid(&step("SIGFOO")));
    assert!(validator.is_valid(&step("{signal}")));
    assert!(validator.is_valid(&step("SIGTERM")));
    assert!(!validator.is_valid(&serde_json::json!({"name": "x", "step": [{"do": "dance"}]})));
}

#[test]
fn the_matrix_expands_into_named_typed_cases() {
    let cases = parse(
        "name='crash'\n[matrix]\nkill=['SIGINT','SIGKILL']\nresolvconf=['debian','openresolv']\n\
         [topology]\nresolvconf='{resolvconf}'\n[[step]]\ndo='crash-client'\npoint='after-dns'\nkill='{kill}'\n",
    )
    .unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "crash[kill=SIGINT,resolvconf=debian]",
            "crash[kill=SIGINT,resolvconf=openresolv]",
            "crash[kill=SIGKILL,resolvconf=debian]",
            "crash[kill=SIGKILL,resolvconf=openresolv]"
        ]
    );
    assert_eq!(cases[1].topology.resolvconf, DnsManager::Openresolv);
    assert!(matches!(&cases[2].steps[0], Step::CrashClient(s) if s.kill == KillMode::Kill));
}

#[test]
fn defaults_fill_what_a_step_leaves_out() {
    let cases = parse("name='x'\n[[step]]\ndo='ping'\nto='service:web'\n[[step]]\ndo='stop-client'\n").err();
    // stop-client needs a running client: only that is wrong.
    assert_eq!(cases.map(|p| p.len()), Some(1));
    let cases = parse("name='x'\n[[step]]\ndo='start-client'\n[[step]]\ndo='ping'\nto='app'\n").unwrap();
    match &cases[0].steps[..] {
        [Step::StartClient(c), Step::Ping(p)] => {
            assert_eq!(c.name, "main");
            assert_eq!(p.to, Target::Pod("app".into()));
            assert!(!p.ipv6);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_syntax_error_is_one_problem_at_its_line() {
    assert!(problem("name = 'x'\n[[step]]\ndo = \n").starts_with("3: "));
}

#[test]
fn unknown_keys_are_named_with_the_allowed_ones() {
    assert_eq!(
        problem("name = 'x'\ncolour = 'red'\n[[step]]\ndo = 'start-servers'\n"),
        "2: unknown key `colour`; the allowed keys are name, description, matrix, topology, impairments, step"
    );
    assert_eq!(
        problem("name = 'x'\n[[step]]\ndo = 'ping'\nto = 'app'\ncolour = 'red'\n"),
        "5: unknown key `colour` in a `ping` step; the allowed keys are to, ipv6, expect_failure"
    );
    assert_eq!(
        problem("name = 'x'\n[topology]\nsize = 'huge'\n[[step]]\ndo = 'start-servers'\n")
            .split(';')
            .next(),
        Some("3: unknown key `size` in [topology]")
    );
    assert_eq!(
        problem("name = 'x'\n[[step]]\ndo = 'add-node'\nname = 'node2'\n"),
        "4: unknown key `name` in a `add-node` step, which takes no other keys"
    );
}

#[test]
fn unknown_step_kinds_and_values_list_the_allowed_ones() {
    let kind = problem("name = 'x'\n[[step]]\ndo = 'dance'\n");
    assert!(
        kind.starts_with("3: unknown step kind \"dance\"; the allowed values are start-servers, "),
        "{kind}"
    );
    assert_eq!(
        problem(&format!(
            "{NAME}{START}[[step]]\ndo = 'start-client'\n[[step]]\ndo = 'stop-client'\nsignal = 'SIGFOO'\n"
        )),
        "8: unknown signal \"SIGFOO\"; the allowed values are SIGINT, SIGTERM"
    );
    assert_eq!(
        problem(&format!("{NAME}[topology]\nresolvconf = 'systemd-resolvd'\n{START}")),
        "3: unknown DNS manager \"systemd-resolvd\"; the allowed values are debian, openresolv, systemd-resolved"
    );
    assert!(problem("name = 'x'\n[[step]]\n").contains("a step needs `do`"));
    assert_eq!(
        problem("name = 'x'\n[[step]]\ndo = 'ping'\n"),
        "2: a `ping` step needs `to`"
    );
    assert!(problem("name = 'x'\n[[step]]\ndo = 'ping'\nto = 3\n").starts_with("4: invalid type: integer"));
    assert!(
        problem("name = 'x'\n[[step]]\ndo = 'run'\non = 'moon'\ncommand = 'true'\n")
            .starts_with("4: unknown place \"moon\"; the allowed values are laptop, node, router, home, pod:NAME")
    );
}

#[test]
fn names_must_exist_by_the_step_that_uses_them() {
    let pod = problem(&format!("{NAME}{START}[[step]]\ndo = 'ping'\nto = 'shop'\n"));
    assert!(pod.starts_with("6: no pod \"shop\" exists here"), "{pod}");
    // Added earlier, or removed earlier (checks may aim at what is gone): fine.
    parse(&format!(
        "{NAME}{START}[[step]]\ndo = 'add-pod'\nname = 'shop'\n[[step]]\ndo = 'remove-pod'\nname = 'shop'\n\
         [[step]]\ndo = 'tcp-echo'\nto = 'shop'\nexpect_failure = true\n"
    ))
    .unwrap();
    let client = problem(&format!(
        "{NAME}{START}[[step]]\ndo = 'kill-client'\nname = 'ghost'\nsignal = 'SIGKILL'\n"
    ));
    assert!(client.starts_with("6: no client \"ghost\" runs here"), "{client}");
    let profile = problem(&format!(
        "{NAME}{START}[impairments.slow]\nrate_mbit = 1\n[[step]]\ndo = 'impair'\nprofile = 'fast'\n"
    ));
    assert_eq!(profile, "8: no [impairments.fast] table; the profiles are slow");
    let service = problem(&format!("{NAME}{START}[[step]]\ndo = 'http'\nto = 'service:shop'\n"));
    assert!(service.starts_with("6: no service \"shop\" exists here"), "{service}");
    let node = problem(&format!(
        "{NAME}{START}[[step]]\ndo = 'add-pod'\nname = 'far'\nnode = 'node2'\n"
    ));
    assert_eq!(node, "7: no node \"node2\" runs here (nodes: node1)");
    let cluster = problem(&format!("{NAME}{START}[[step]]\ndo = 'use-cluster'\nname = 'b'\n"));
    assert_eq!(
        cluster,
        "6: no cluster \"b\"; the allowed values are a ([topology] clusters = 1)"
    );
    let kube = problem(&format!("{NAME}{START}[[step]]\ndo = 'start-client'\npod = 'x'\n"));
    assert_eq!(
        kube,
        "6: `pod` needs a Kubernetes API; set [topology] kubernetes = true"
    );
    let twice = problem(&format!(
        "{NAME}{START}[[step]]\ndo = 'start-client'\n[[step]]\ndo = 'start-client'\n"
    ));
    assert!(twice.starts_with("6: client \"main\" already runs here"), "{twice}");
}

#[test]
fn placeholders_must_name_an_axis_and_axes_must_be_used() {
    assert_eq!(
        problem(&format!("{NAME}[matrix]\nkill = ['SIGINT']\n{START}[[step]]\ndo = 'crash-client'\npoint = '{{nope}}'\nkill = '{{kill}}'\n")),
        "8: `{nope}` names no matrix axis; the allowed values are {kill}"
    );
    assert_eq!(
        problem(&format!("{NAME}[matrix]\nkill = ['SIGINT']\n{START}")),
        "3: matrix axis `kill` is used nowhere; put `{kill}` in [topology] or a step, or remove the axis"
    );
    assert!(problem(&format!("{NAME}[matrix]\nkill = []\n{START}"))
        .starts_with("3: matrix axis `kill` must be a non-empty list"));
    // A value from the matrix is checked like any other, at the line that uses it.
    assert_eq!(
        problem(&format!("{NAME}[matrix]\nkill = ['SIGFOO']\n{START}[[step]]\ndo = 'crash-client'\npoint = 'after-dns'\nkill = '{{kill}}'\n")),
        "9: unknown kill mode \"SIGFOO\"; the allowed values are SIGINT, SIGTERM, SIGKILL, SIGKILL-group"
    );
}

#[test]
fn out_of_range_profiles_are_refused() {
    let p = problem(&format!("{NAME}[impairments.bad]\nloss_percent = 120\n{START}"));
    assert!(
        p.ends_with("[impairments.bad]: loss_percent = 120 is out of range; the allowed values are 0 to 100"),
        "{p}"
    );
}

#[test]
fn out_of_range_topologies_are_refused() {
    assert_eq!(
        problem(&format!("{NAME}[topology]\nnodes = 0\n{START}")),
        "3: nodes = 0 is out of range; the allowed values are 1 to 50"
    );
}

/// Every problem of a file full of mistakes in its form, as the user sees them.
#[test]
fn error_messages_for_the_form() {
    let text = "\
name = 'broken'
colour = 'red'
[matrix]
dns = ['debian', 'systemd-resolvd']
unused = ['a']
[topology]
resolvconf = '{dns}'
nodes = 'two'
[impairments.slow]
rate_mbit = 1
delay = 3
[[step]]
do = 'start-servers'
[[step]]
do = 'stop-client'
signal = 'SIGFOO'
[[step]]
do = 'dance'
[[step]]
do = 'route'
to = 'Shop!'
within = 'soon'
[[step]]
do = 'log-contains'
process = 'client:a'
text = '{missing}'
";
    insta::assert_snapshot!(problems(text).join("\n"));
}

/// Every problem of a well-formed file whose steps name what does not exist.
#[test]
fn error_messages_for_names() {
    let text = "\
name = 'dangling'
[topology]
kubernetes = false
[impairments.slow]
rate_mbit = 1
[[step]]
do = 'start-servers'
[[step]]
do = 'start-client'
kubeconfig = 'wrong-token'
expect_error = 'x'
[[step]]
do = 'ping'
to = 'shopp'
[[step]]
do = 'impair'
profile = 'fast'
[[step]]
do = 'kill-client'
name = 'ghost'
signal = 'SIGKILL'
[[step]]
do = 'log-contains'
process = 'client:ghost'
text = 'hello'
[[step]]
do = 'remove-node'
name = 'node1'
[[step]]
do = 'route'
to = 'service:web'
ipv6 = true
[[step]]
do = 'compact-api'
";
    insta::assert_snapshot!(problems(text).join("\n"));
}

/// The roaming steps: the home LAN they need, probes and transfers paired,
/// a sleeping client that runs.
#[test]
fn error_messages_for_roaming() {
    let text = "\
name = 'roaming-wrong'
[topology]
lan = false
no_lan_because = 'testing'
[[step]]
do = 'start-servers'
[[step]]
do = 'change-address'
[[step]]
do = 'stop-probe'
[[step]]
do = 'start-probe'
to = 'ap'
[[step]]
do = 'start-probe'
to = 'app'
[[step]]
do = 'finish-transfer'
[[step]]
do = 'sleep'
seconds = 5
client = 'ghost'
[[step]]
do = 'switch-uplink'
to = 'second'
";
    insta::assert_snapshot!(problems(text).join("\n"));
}

/// Found by the scenario_file fuzz target's review: a few hundred bytes of
/// short axes would ask for more cases than memory holds.
#[test]
fn a_matrix_of_too_many_cases_is_refused() {
    let axes: String = (0..11).map(|i| format!("a{i} = ['x', 'y']\n")).collect();
    let found = problems(&format!("{NAME}[matrix]\n{axes}{START}"));
    assert!(
        found
            .iter()
            .any(|p| p.contains("the matrix makes 2048 cases; at most 1000")),
        "{found:#?}"
    );
}
