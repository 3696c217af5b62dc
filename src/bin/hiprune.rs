//! The `hiprune` command-line tool.

fn main() {
    println!("hiprune {}", hiprune::VERSION);
}
