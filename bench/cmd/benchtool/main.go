// Command benchtool holds the small measuring helpers of bench/run.sh: the
// metadata loop, the deterministic file tree, precise timing of single
// syscalls, fio and /proc/meminfo parsing, and the Markdown report.
//
// It uses the standard library only, so the bench needs nothing beyond the
// repository's Go toolchain.
//
//	benchtool meta -dir D [-n 20000] [-dirs 20] [-size 100]
//	benchtool gentree -dir D [-n 5000] [-seed 1]
//	benchtool files -dir D
//	benchtool append FILE
//	benchtool rename OLD NEW
//	benchtool fio FILE.json
//	benchtool meminfo
//	benchtool memback -base KIB -peak KIB [-timeout 30s]
//	benchtool report -raw RAW.tsv
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	cmds := map[string]func([]string) error{
		"meta":    cmdMeta,
		"files":   cmdFiles,
		"gentree": cmdGentree,
		"append":  cmdAppend,
		"rename":  cmdRename,
		"fio":     cmdFio,
		"meminfo": cmdMeminfo,
		"memback": cmdMemback,
		"report":  cmdReport,
	}
	run, ok := cmds[os.Args[1]]
	if !ok {
		usage()
	}
	if err := run(os.Args[2:]); err != nil {
		if e, ok := err.(exitError); ok {
			os.Exit(int(e))
		}
		fmt.Fprintf(os.Stderr, "benchtool %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// exitError makes main exit with a specific code (e.g. 3 for EXDEV).
type exitError int

func (e exitError) Error() string { return fmt.Sprintf("exit %d", int(e)) }

func usage() {
	fmt.Fprintln(os.Stderr, "usage: benchtool meta|files|gentree|append|rename|fio|meminfo|memback|report ... (see bench/README.md)")
	os.Exit(2)
}
