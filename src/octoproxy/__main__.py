from octoproxy.cli import main

main()
