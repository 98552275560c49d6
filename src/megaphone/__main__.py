from megaphone.cli import main

main()
