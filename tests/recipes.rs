//! The fixture cases of the recipe compiler, through their recipes in rewrites/: parity with
//! diffusers within 1e-4, and each rewrite changes the output where its case does.

mod common;
use common::*;
use rewire::exec::LowerOptions;

fn parity(recipe: &str, case_name: &str, fuse: bool, changes_output: bool) {
    let out = recipe_case(recipe, case_name, fuse);
    let want = expected(&case(case_name), "out");
    let err = out["out"].max_abs_diff(&want);
    println!("{case_name} (fuse {fuse}): max abs error {err:e}");
    assert!(err <= 1e-4, "{case_name}: max abs error {err}");
    let base = forward_case(&tiny_sd(), &case(case_name), LowerOptions::default());
    let moved = out["out"].max_abs_diff(&base);
    if changes_output {
        assert!(
            moved > 1e-3,
            "{case_name}: the rewrite did not change the output ({moved})"
        );
    } else {
        assert!(moved <= 1e-5, "{case_name}: the output moved by {moved}");
    }
}

#[test]
fn reweight() {
    parity("reweight.ron", "reweight", true, true);
}

#[test]
fn reweight_unfused() {
    parity("reweight.ron", "reweight", false, true);
}

#[test]
fn reweight_up_only() {
    parity("reweight_up_only.ron", "reweight_up_only", true, true);
}

#[test]
fn reweight_renorm() {
    parity("reweight_renorm.ron", "reweight_renorm", true, true);
}

#[test]
fn reweight_renorm_unfused() {
    parity("reweight_renorm.ron", "reweight_renorm", false, true);
}

#[test]
fn replace_maps() {
    parity("replace_maps.ron", "replace_maps", true, true);
}

#[test]
fn fused_and_unfused_reweights_agree() {
    for (r, c) in [
        ("reweight.ron", "reweight"),
        ("reweight_renorm.ron", "reweight_renorm"),
    ] {
        let a = recipe_case(r, c, true);
        let b = recipe_case(r, c, false);
        let d = a["out"].max_abs_diff(&b["out"]);
        println!("{c}: fused vs unfused {d:e}");
        assert!(d <= 1e-5, "{c}: fused and unfused differ by {d}");
    }
}

#[test]
fn store_records_every_fixture_map() {
    let out = recipe_case("store.ron", "store", true);
    let path = case("store");
    let f = rewire::weights::TensorFiles::open(&path).unwrap();
    let mut n = 0;
    for name in f.names().filter(|n| n.starts_with("probs.")) {
        let want = expected(&path, name);
        let got = out.get(name).unwrap_or_else(|| panic!("{name} not stored"));
        let e = got.max_abs_diff(&want);
        assert!(
            e <= 1e-4,
            "{name}: {e} (shapes {:?} vs {:?})",
            got.shape,
            want.shape
        );
        n += 1;
    }
    assert!(n >= 17, "the fixture keeps at least 17 maps, compared {n}");
    let want = expected(&path, "out");
    assert!(out["out"].max_abs_diff(&want) <= 1e-4);
    let base = forward_case(&tiny_sd(), &path, LowerOptions::default());
    assert!(
        out["out"].max_abs_diff(&base) <= 1e-5,
        "a store must not change the output"
    );
}
