//! The official GLUE TSV files. They are not quoted: `"` is an ordinary character and only a tab
//! separates columns. Every file but CoLA's train/dev has a header, and columns are found by
//! their header names; a file is unlabeled (a test file) when its header lacks the label column.

use super::{for_each_line, line_id, task_key, Collector, DataError, RawExample, ReadOptions, ReadReport};
use std::collections::BTreeMap;
use std::path::Path;

/// GLUE tasks [`read_glue_tsv`] knows.
pub const GLUE_TASKS: &[&str] = &["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "ax"];

/// Where a headed GLUE file keeps a task's id, inputs and label.
struct Layout {
    /// Id column; files without it (SST-2, MRPC train/dev) get `line-N` ids.
    id: &'static str,
    /// (header column, field name) for each input.
    fields: &'static [(&'static str, &'static str)],
    /// Label column; test files lack it.
    label: &'static str,
}

fn layout(task: &str) -> Option<Layout> {
    const PAIR: &[(&str, &str)] = &[("sentence1", "sentence1"), ("sentence2", "sentence2")];
    const NLI: &[(&str, &str)] = &[("sentence1", "premise"), ("sentence2", "hypothesis")];
    let l = |id, fields, label| Some(Layout { id, fields, label });
    match task {
        // CoLA's train/dev files have no header; its test file is `index<TAB>sentence`.
        "cola" | "sst2" => l("index", &[("sentence", "sentence")], "label"),
        "mrpc" => l("index", &[("#1 String", "sentence1"), ("#2 String", "sentence2")], "Quality"),
        "qqp" => l("id", &[("question1", "question1"), ("question2", "question2")], "is_duplicate"),
        "stsb" => l("index", PAIR, "score"),
        "mnli" => l("index", NLI, "gold_label"),
        "qnli" => l("index", &[("question", "question"), ("sentence", "sentence")], "label"),
        "rte" | "wnli" => l("index", PAIR, "label"),
        "ax" => l("index", NLI, "label"),
        _ => None,
    }
}

/// Reads an official GLUE TSV file of `task` (one of [`GLUE_TASKS`]; `SST-2`, `STS-B` also work).
///
/// Fields: cola/sst2 `sentence`; mrpc/rte/wnli/stsb `sentence1`, `sentence2`; qqp `question1`,
/// `question2`; mnli/ax `premise`, `hypothesis`; qnli `question`, `sentence`. Labels stay as the
/// file spells them: CoLA/SST-2/MRPC/QQP/WNLI `0`/`1`, STS-B the score text, MNLI `gold_label`,
/// QNLI/RTE `entailment`/`not_entailment`. Train, dev (MNLI matched and mismatched) and the
/// unlabeled test files are all accepted.
pub fn read_glue_tsv(task: &str, path: &Path, opts: ReadOptions) -> Result<ReadReport, DataError> {
    let key = task_key(task);
    let Some(layout) = layout(&key) else {
        return Err(DataError::new(
            path,
            None,
            format!("unknown GLUE task {task:?} (known: {})", GLUE_TASKS.join(", ")),
        ));
    };
    let mut rows = Collector::new(path, opts);
    let mut columns: Option<Columns> = None;
    for_each_line(path, |number, line| {
        let line = match line {
            Ok(l) => l,
            Err(problem) if number == 1 => return Err(rows.fatal(number, problem)),
            Err(problem) => return rows.row(number, Err(problem)),
        };
        let cells: Vec<&str> = line.split('\t').collect();
        match &columns {
            None => {
                let found = if key == "cola" && line != "index\tsentence" {
                    // CoLA train/dev: no header; this first line is already a row.
                    Columns::cola_headerless()
                } else {
                    Columns::from_header(&layout, &cells).map_err(|p| rows.fatal(number, p))?
                };
                let is_row = found.headerless;
                columns = Some(found);
                if is_row {
                    let outcome = columns.as_ref().expect("just set").example(number, &cells);
                    rows.row(number, outcome)?;
                }
                Ok(())
            }
            Some(cols) => rows.row(number, cols.example(number, &cells)),
        }
    })?;
    if columns.is_none() {
        return Err(rows.file_error("the file is empty"));
    }
    Ok(rows.finish())
}

/// Column positions of one file.
struct Columns {
    width: usize,
    id: Option<usize>,
    fields: Vec<(usize, &'static str)>,
    label: Option<(usize, &'static str)>,
    headerless: bool,
}

impl Columns {
    /// CoLA train/dev: source, label, original judgement (`*` or empty), sentence.
    fn cola_headerless() -> Self {
        Self { width: 4, id: None, fields: vec![(3, "sentence")], label: Some((1, "label")), headerless: true }
    }

    fn from_header(layout: &Layout, header: &[&str]) -> Result<Self, String> {
        let find = |name: &str| header.iter().position(|h| *h == name);
        let mut fields = Vec::new();
        for (column, field) in layout.fields {
            match find(column) {
                Some(i) => fields.push((i, *field)),
                None => {
                    return Err(format!(
                        "expected a header with column {column:?}; found columns {:?}",
                        header.join(" | ")
                    ))
                }
            }
        }
        Ok(Self {
            width: header.len(),
            id: find(layout.id),
            fields,
            label: find(layout.label).map(|i| (i, layout.label)),
            headerless: false,
        })
    }

    fn example(&self, line: usize, cells: &[&str]) -> Result<Vec<RawExample>, String> {
        if cells.len() != self.width {
            return Err(format!("expected {} tab-separated columns, found {}", self.width, cells.len()));
        }
        let label = match self.label {
            Some((i, _)) if !cells[i].is_empty() => Some(cells[i].to_string()),
            Some((_, name)) => return Err(format!("empty label column {name:?}")),
            None => None,
        };
        let id = match self.id {
            Some(i) if !cells[i].is_empty() => cells[i].to_string(),
            _ => line_id(line),
        };
        let fields: BTreeMap<String, String> =
            self.fields.iter().map(|(i, name)| (name.to_string(), cells[*i].to_string())).collect();
        Ok(vec![RawExample { id, fields, label, group: None, answers: Vec::new(), line }])
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_files;
    use super::*;

    fn read(task: &str, text: &str) -> ReadReport {
        read_glue_tsv(task, &test_files::write(&format!("{task}.tsv"), text), ReadOptions::default()).unwrap()
    }

    fn read_err(task: &str, text: &str) -> DataError {
        read_glue_tsv(task, &test_files::write(&format!("{task}.tsv"), text), ReadOptions::default()).unwrap_err()
    }

    fn skipping(task: &str, text: &str) -> ReadReport {
        let opts = ReadOptions { skip_bad_rows: true };
        read_glue_tsv(task, &test_files::write(&format!("{task}.tsv"), text), opts).unwrap()
    }

    #[test]
    fn cola_train_has_no_header_and_test_has_one() {
        let train = "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n\
                     gj04\t0\t*\tThey drank the pub \"dry\".\n";
        let r = read("cola", train);
        assert_eq!(r.examples.len(), 2);
        let e = &r.examples[1];
        assert_eq!(e.id, "line-2");
        assert_eq!(e.label.as_deref(), Some("0"));
        // Quotes are ordinary characters.
        assert_eq!(e.field("sentence"), "They drank the pub \"dry\".");
        assert_eq!(e.line, 2);

        let test = "index\tsentence\n0\tBill whistled past the house.\n1\tThe car honked its way down the road.\n";
        let r = read("CoLA", test);
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.examples[1].id, "1");
        assert_eq!(r.examples[1].label, None);
        assert_eq!(r.examples[1].line, 3);
        assert!(!r.is_labeled());
    }

    #[test]
    fn cola_wrong_column_count_names_the_line() {
        let train = "gj04\t1\t\tFine.\ngj04\t1\tBroken row.\ngj04\t0\t*\tAlso fine.\n";
        let e = read_err("cola", train);
        assert_eq!(e.line, Some(2));
        assert!(e.problem.contains("expected 4"), "{e}");
        let r = skipping("cola", train);
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.skipped.len(), 1);
        assert_eq!(r.skipped[0].line, Some(2));
    }

    #[test]
    fn sst2_train_and_test() {
        let r = read(
            "sst2",
            "sentence\tlabel\nhide new secretions from the parental units \t0\nthe greatest \"musicians\" \t1\n",
        );
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.examples[0].id, "line-2");
        assert_eq!(r.examples[0].field("sentence"), "hide new secretions from the parental units ");
        assert_eq!(r.examples[1].label.as_deref(), Some("1"));
        let r = read("SST-2", "index\tsentence\n0\tuneasy mishmash of styles and genres .\n");
        assert_eq!(r.examples[0].id, "0");
        assert_eq!(r.examples[0].label, None);
    }

    #[test]
    fn mrpc_train_with_bom_and_test() {
        let train = "\u{feff}Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n\
                     1\t702876\t702977\tAmrozi accused his brother , whom he called \" the witness \" , of deliberately distorting his evidence .\tReferring to him as only \" the witness \" , Amrozi accused his brother of deliberately distorting his evidence .\n\
                     0\t2108705\t2108831\tYucaipa owned Dominick 's before selling the chain to Safeway in 1998 for $ 2.5 billion .\tYucaipa bought Dominick 's in 1995 for $ 693 million and sold it to Safeway for $ 1.8 billion in 1998 .\n";
        let r = read("mrpc", train);
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.examples[0].label.as_deref(), Some("1"));
        assert!(r.examples[0].field("sentence1").starts_with("Amrozi accused"));
        assert!(r.examples[1].field("sentence2").starts_with("Yucaipa bought"));
        let test = "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n\
                    0\t1089874\t1089925\tPCCW 's chief operating officer , Mike Butcher , and Alex Arena , the chief financial officer , will report directly to Mr So .\tCurrent Chief Operating Officer Mike Butcher and Group Chief Financial Officer Alex Arena will report to So .\n";
        let r = read("mrpc", test);
        assert_eq!(r.examples[0].id, "0");
        assert_eq!(r.examples[0].label, None);
    }

    #[test]
    fn qqp_train_and_test() {
        let train = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n\
                     133273\t213221\t213222\tHow is the life of a math student? Could you describe your own experiences?\tWhich level of prepration is enough for the exam jlpt5?\t0\n";
        let r = read("qqp", train);
        assert_eq!(r.examples[0].id, "133273");
        assert_eq!(r.examples[0].label.as_deref(), Some("0"));
        assert!(r.examples[0].field("question2").starts_with("Which level"));
        let r = read("qqp", "id\tquestion1\tquestion2\n0\tWhy am I mentally very lonely?\tFind the remainder?\n");
        assert_eq!(r.examples[0].label, None);
        assert_eq!(r.examples[0].field("question1"), "Why am I mentally very lonely?");
    }

    #[test]
    fn stsb_train_and_test() {
        let train = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n\
                     0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n\
                     1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a large flute.\tA man is playing a flute.\t3.800\n";
        let r = read("STS-B", train);
        assert_eq!(r.examples[1].label.as_deref(), Some("3.800"));
        assert_eq!(r.examples[1].field("sentence2"), "A man is playing a flute.");
        let test = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\n\
                    0\tmain-captions\tMSRvid\t2012test\t0024\tnone\tnone\tA girl is styling her hair.\tA girl is brushing her hair.\n";
        let r = read("stsb", test);
        assert_eq!(r.examples[0].label, None);
    }

    const MNLI_HEAD: &str = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2";

    #[test]
    fn mnli_train_dev_and_test() {
        let train = format!(
            "{MNLI_HEAD}\tlabel1\tgold_label\n\
             0\t31193\t31193n\tgovernment\t( ( Conceptually cream ) skimming )\t( Product ... )\t(ROOT (S))\t(ROOT (S))\tConceptually cream skimming has two basic dimensions - product and geography.\tProduct and geography are what make cream skimming work. \tneutral\tneutral\n"
        );
        let r = read("mnli", &train);
        assert_eq!(r.examples[0].label.as_deref(), Some("neutral"));
        assert!(r.examples[0].field("premise").starts_with("Conceptually"));
        assert_eq!(r.examples[0].field("hypothesis"), "Product and geography are what make cream skimming work. ");
        let dev = format!(
            "{MNLI_HEAD}\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n\
             0\t63735\t63735n\tslate\t( a )\t( b )\t(ROOT)\t(ROOT)\tThe new rights are nice enough\tEveryone really likes the newest benefits \tneutral\tentailment\tneutral\tneutral\tneutral\tneutral\n\
             1\t91383\t91383c\tgovernment\t( a )\t( b )\t(ROOT)\t(ROOT)\tThis site includes a list of all award winners.\tThe Government Executive articles housed on the website are not able to be searched.\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\n"
        );
        let r = read("mnli", &dev);
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.examples[1].label.as_deref(), Some("contradiction"));
        assert_eq!(r.examples[1].id, "1");
        let test =
            format!("{MNLI_HEAD}\n0\t31\t31e\tfiction\t( a )\t( b )\t(ROOT)\t(ROOT)\tHey, I'm here.\tI am here.\n");
        let r = read("mnli", &test);
        assert_eq!(r.examples[0].label, None);
        assert_eq!(r.examples[0].field("hypothesis"), "I am here.");
    }

    #[test]
    fn qnli_rte_wnli_ax() {
        let r = read(
            "qnli",
            "index\tquestion\tsentence\tlabel\n0\tWhat came into force after the new constitution was herald?\tAs of that day, the new constitution heralding the Second Republic came into force.\tentailment\n",
        );
        assert_eq!(r.examples[0].label.as_deref(), Some("entailment"));
        assert!(r.examples[0].field("question").starts_with("What came"));
        let r = read("rte", "index\tsentence1\tsentence2\tlabel\n0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons of Mass Destruction Found in Iraq.\tnot_entailment\n");
        assert_eq!(r.examples[0].label.as_deref(), Some("not_entailment"));
        let r = read("rte", "index\tsentence1\tsentence2\n0\tMangla was summoned after Madhumita's sister Nidhi Shukla.\tShukla is related to Mangla.\n");
        assert_eq!(r.examples[0].label, None);
        let r = read("wnli", "index\tsentence1\tsentence2\tlabel\n0\tI stuck a pin through a carrot. When I pulled the pin out, it had a hole.\tThe carrot had a hole.\t1\n");
        assert_eq!(r.examples[0].label.as_deref(), Some("1"));
        let r =
            read("ax", "index\tsentence1\tsentence2\n0\tThe cat sat on the mat.\tThe cat did not sit on the mat.\n");
        assert_eq!(r.examples[0].field("premise"), "The cat sat on the mat.");
        assert_eq!(r.examples[0].label, None);
    }

    #[test]
    fn headed_file_errors_and_skips() {
        let text = "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n2\ta\tb\t\n3\ta\tb\tentailment\n";
        let e = read_err("rte", text);
        assert_eq!(e.line, Some(3));
        assert!(e.problem.contains("expected 4 tab-separated columns, found 3"), "{e}");
        let r = skipping("rte", text);
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.skipped.iter().map(|s| s.line).collect::<Vec<_>>(), vec![Some(3), Some(4)]);
        assert!(r.skipped[1].problem.contains("empty label"));
    }

    #[test]
    fn wrong_header_unknown_task_and_empty_file_are_file_errors() {
        let e = read_err("qnli", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n");
        assert_eq!(e.line, Some(1));
        assert!(e.problem.contains("\"question\""), "{e}");
        let e = read_err("squad", "x\n");
        assert!(e.problem.contains("unknown GLUE task"));
        let e = read_err("rte", "");
        assert!(e.problem.contains("empty"));
    }
}
