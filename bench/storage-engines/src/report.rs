//! Collects one value per (table, row, column) per run and renders markdown
//! tables of "median ±spread".

use std::fmt::Write;

#[derive(Default)]
struct Table {
    title: String,
    row_headers: Vec<String>,
    cols: Vec<String>,
    rows: Vec<Vec<String>>,
    /// (row index, col index) -> one value per run
    cells: Vec<((usize, usize), Vec<f64>)>,
}

#[derive(Default)]
pub struct Report {
    tables: Vec<Table>,
}

fn default_headers(n: usize) -> Vec<String> {
    let h: &[&str] = match n {
        1 => &["engine"],
        2 => &["engine", "mode"],
        _ => &["engine", "entry", "entries per commit"],
    };
    h.iter().map(|s| s.to_string()).collect()
}

impl Report {
    pub fn put(&mut self, table: &str, row: &[&str], col: &str, v: f64) {
        let ti = match self.tables.iter().position(|t| t.title == table) {
            Some(i) => i,
            None => {
                let row_headers = if table.starts_with("0.") {
                    vec!["operation".to_string()]
                } else {
                    default_headers(row.len())
                };
                self.tables.push(Table {
                    title: table.to_string(),
                    row_headers,
                    ..Default::default()
                });
                self.tables.len() - 1
            }
        };
        let t = &mut self.tables[ti];
        let row: Vec<String> = row.iter().map(|s| s.to_string()).collect();
        let ri = match t.rows.iter().position(|r| *r == row) {
            Some(i) => i,
            None => {
                t.rows.push(row);
                t.rows.len() - 1
            }
        };
        let ci = match t.cols.iter().position(|c| c == col) {
            Some(i) => i,
            None => {
                t.cols.push(col.to_string());
                t.cols.len() - 1
            }
        };
        match t.cells.iter_mut().find(|(k, _)| *k == (ri, ci)) {
            Some((_, vs)) => vs.push(v),
            None => t.cells.push(((ri, ci), vec![v])),
        }
    }

    pub fn render(&self, runs: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Each cell: median of {runs} run(s) ± half the min-max range, as % of the median.\n"
        );
        let mut tables: Vec<&Table> = self.tables.iter().collect();
        tables.sort_by(|a, b| a.title.cmp(&b.title));
        for t in tables {
            let _ = writeln!(out, "### {}\n", t.title);
            let mut hdr: Vec<String> = t.row_headers.clone();
            hdr.extend(t.cols.iter().cloned());
            let _ = writeln!(out, "| {} |", hdr.join(" | "));
            let align: Vec<&str> = hdr
                .iter()
                .enumerate()
                .map(|(i, _)| if i < t.row_headers.len() { "---" } else { "---:" })
                .collect();
            let _ = writeln!(out, "| {} |", align.join(" | "));
            for (ri, row) in t.rows.iter().enumerate() {
                let mut cells = row.clone();
                for ci in 0..t.cols.len() {
                    let c = t
                        .cells
                        .iter()
                        .find(|(k, _)| *k == (ri, ci))
                        .map(|(_, vs)| cell(vs))
                        .unwrap_or_else(|| "–".to_string());
                    cells.push(c);
                }
                let _ = writeln!(out, "| {} |", cells.join(" | "));
            }
            let _ = writeln!(out);
        }
        out
    }
}

fn cell(vs: &[f64]) -> String {
    let mut s = vs.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    let med = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    let spread = if med != 0.0 { (s[n - 1] - s[0]) / 2.0 / med * 100.0 } else { 0.0 };
    if n > 1 {
        format!("{} ±{:.0}%", num(med), spread)
    } else {
        num(med)
    }
}

/// Three significant digits, thousands separated.
fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        let r = if a >= 100_000.0 {
            (v / 1000.0).round() * 1000.0
        } else if a >= 10_000.0 {
            (v / 100.0).round() * 100.0
        } else {
            (v / 10.0).round() * 10.0
        };
        group(r as i64)
    } else if a >= 100.0 {
        format!("{:.0}", v)
    } else if a >= 10.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    }
}

fn group(v: i64) -> String {
    let s = v.abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if v < 0 {
        format!("-{out}")
    } else {
        out
    }
}
